"""The fused DP kernels side by side per provider on a GPU (skipped without one).

Run with `pytest bench/test_bench_kernels.py --benchmark-only` on a CUDA machine:
clip/noise and norms for every backend that runs on CUDA (triton, cuda, torch) on the
benchmark U-Net's ~5.6M parameters, and the per-sample conv weight gradient strategies
(loop / grouped cuDNN, Triton implicit GEMM) on the U-Net's widest 128^3 layer.
bench/gpu_kernels.py prints the same figures with their fraction of copy bandwidth.
"""

import pytest
import torch

from dpseg import ops
from dpseg.privacy.rules import conv_weight_grad as cwg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_BACKENDS = [b for b in ("triton", "cuda", "torch") if b in ops.BACKENDS]


def _sync_call(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="module")
def unet_grads():
    from dpseg.models.unet import UNet

    shapes = [p.shape for p in UNet(channels=(32, 64, 128, 256)).parameters()]
    return {b: [torch.randn((b, *s), device="cuda") for s in shapes] for b in (2, 4)}


@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bench_clip_accumulate_noise_cuda(benchmark, unet_grads, backend, batch):
    grads = unet_grads[batch]
    c = torch.rand(batch, dtype=torch.float64, device="cuda")
    fn = _sync_call(lambda: ops.clip_accumulate_noise(grads, c, 1.0, 0.5, 7, 1, backend=backend))
    benchmark.pedantic(fn, rounds=20 if backend != "torch" else 2, warmup_rounds=1)


@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bench_per_sample_sq_norms_cuda(benchmark, unet_grads, backend, batch):
    grads = unet_grads[batch]
    fn = _sync_call(lambda: ops.per_sample_sq_norms(grads, backend=backend))
    benchmark.pedantic(fn, rounds=20, warmup_rounds=1)


@pytest.mark.parametrize("strategy", ["loop", "grouped", "triton"])
def test_bench_conv_weight_grad_32ch_128(benchmark, strategy):
    if strategy == "triton" and "triton" not in ops.BACKENDS:
        pytest.skip("triton not available")
    x = torch.randn(2, 32, 128, 128, 128, device="cuda")
    w = torch.randn(32, 32, 3, 3, 3, device="cuda")
    geometry = ([1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)
    go = torch.randn_like(x)
    fn = _sync_call(lambda: cwg.per_sample_conv_weight_grad(go, x, w, *geometry, strategy=strategy))
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
