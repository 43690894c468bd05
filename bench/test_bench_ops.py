"""The fused DP ops, C++ against the pure-PyTorch reference, on ~1.16M parameters.

Run with `pytest bench --benchmark-only`. The parameter set is three 3x3x3 conv layers of a
small 3D U-Net stage plus biases and a 1x1x1 head, so both the large-tensor path and the
many-small-tensors path of the kernels are timed.
"""

import math

import pytest
import torch

from dpseg.ops import BACKENDS, clip_accumulate_noise, gaussian_noise, per_sample_sq_norms

SHAPES = [(64, 32, 3, 3, 3), (64,), (128, 64, 3, 3, 3), (128,), (256, 128, 3, 3, 3), (256,),
          (8, 256, 1, 1, 1)]  # fmt: skip
NUMEL = sum(math.prod(s) for s in SHAPES)  # 1,163,712
BACKEND_NAMES = sorted(n for n, b in BACKENDS.items() if b.runs_on(torch.device("cpu")))
# The reference runs a Python loop over B and ~150 tensor ops for the noise: about a second
# per call, so one round (and no warm-up) keeps the suite quick.
ROUNDS = {"cpp": 10, "torch": 1}


def _grads(batch):
    g = torch.Generator().manual_seed(batch)
    return [torch.randn((batch, *s), generator=g) for s in SHAPES]


def _run(benchmark, backend, fn):
    benchmark.extra_info.update(numel=NUMEL, threads=torch.get_num_threads())
    warmup = 1 if ROUNDS[backend] > 1 else 0
    return benchmark.pedantic(fn, rounds=ROUNDS[backend], iterations=1, warmup_rounds=warmup)


@pytest.mark.parametrize("batch", [2, 16])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_bench_per_sample_sq_norms(benchmark, backend, batch):
    grads = _grads(batch)
    out = _run(benchmark, backend, lambda: per_sample_sq_norms(grads, backend=backend))
    assert out.shape == (batch,)


@pytest.mark.parametrize("batch", [2, 16])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_bench_clip_accumulate_noise(benchmark, backend, batch):
    grads = _grads(batch)
    c = torch.rand(batch, dtype=torch.float64)
    outs = _run(
        benchmark,
        backend,
        lambda: clip_accumulate_noise(grads, c, 1.0, 1 / batch, seed=7, step=1, backend=backend),
    )
    assert outs[0].shape == SHAPES[0]


@pytest.mark.parametrize("draws", [1, 4])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_bench_gaussian_noise(benchmark, backend, draws):
    out = _run(
        benchmark, backend, lambda: gaussian_noise(NUMEL, 7, 1, draws=draws, backend=backend)
    )
    assert out.shape == (NUMEL,)
