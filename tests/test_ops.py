"""per_sample_sq_norms and clip_accumulate_noise: every backend against a float64 oracle,
the C++ kernels against the reference bit for bit, and opcheck on the registered ops."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpseg.ops import BACKENDS, clip_accumulate_noise, gaussian_noise, per_sample_sq_norms

needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="dpseg C++ extension not built")
# Backends that run on CPU tensors: "cpp" (when built) and "torch"; "triton" only under
# TRITON_INTERPRET=1, "cuda" never (their own tests cover them on a GPU).
ALL = sorted(n for n, b in BACKENDS.items() if b.runs_on(torch.device("cpu")))
SHAPES = [(3, 3, 3, 3), (7,), (), (1, 13), (2, 5, 1, 1, 1)]  # awkward: odd, scalar, unit dims


def make_grads(batch, shapes, dtype, noncontiguous=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn((batch, *shape), dtype=dtype, generator=g) * (1 + i)
        if noncontiguous and t.dim() >= 3:
            t = torch.randn((batch, *shape[::-1]), dtype=dtype, generator=g)
            t = t.permute(0, *range(t.dim() - 1, 0, -1))  # same shape, reversed strides
        elif noncontiguous:
            t = torch.randn((batch, *shape, 2), dtype=dtype, generator=g)[..., 0]
        out.append(t)
    return out


def oracle_sq_norms(grads):
    batch = grads[0].shape[0]
    return torch.tensor(
        [
            math.fsum(float(x) ** 2 for g in grads for x in g[b].double().flatten())
            for b in range(batch)
        ],
        dtype=torch.float64,
    )


def oracle_clip_sum(grads, c):
    """sum_b c_b G[b] in float64 (einsum: any order), as the no-noise result."""
    return [torch.einsum("b,b...->...", c, g.double()) for g in grads]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [0, 1, 5])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_sq_norms_match_oracle(backend, dtype, batch, noncontiguous):
    grads = make_grads(batch, SHAPES, dtype, noncontiguous)
    got = per_sample_sq_norms(grads, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (batch,)
    torch.testing.assert_close(got, oracle_sq_norms(grads), rtol=1e-13, atol=0)


@needs_cpp
def test_sq_norms_large_blocks_and_thread_count_independent():
    # Rows longer than the C++ block size (16384) and more blocks than threads.
    grads = make_grads(3, [(70_001,), (33, 1000)], torch.float32)
    got = per_sample_sq_norms(grads, backend="cpp")
    want = torch.stack([sum(g[b].double().square().sum() for g in grads) for b in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(per_sample_sq_norms(grads, backend="cpp"), got)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1.2e-7), (torch.float64, 1e-13)])
@pytest.mark.parametrize("batch", [1, 6])
def test_clip_without_noise_is_the_weighted_sum(backend, dtype, rtol, batch):
    grads = make_grads(batch, SHAPES, dtype, noncontiguous=True)
    c = torch.rand(batch, dtype=torch.float64) + 0.05
    outs = clip_accumulate_noise(grads, c, 0.0, 0.25, seed=1, step=2, backend=backend)
    for got, want, g in zip(outs, oracle_clip_sum(grads, c), grads, strict=True):
        assert got.dtype == dtype and got.shape == g.shape[1:]
        torch.testing.assert_close(got.double(), 0.25 * want, rtol=rtol, atol=1e-15)


@pytest.mark.parametrize("backend", ALL)
def test_clip_with_empty_batch_is_pure_noise(backend):
    grads = [torch.empty(0, 4, 5), torch.empty(0, 3, dtype=torch.float64)]
    outs = clip_accumulate_noise(grads, torch.empty(0, dtype=torch.float64), 2.0, 0.5, 9, 4,
                                 backend=backend)  # fmt: skip
    z = gaussian_noise(23, 9, 4, dtype=torch.float64)
    assert torch.equal(outs[0], (0.5 * (2.0 * z[:20])).float().view(4, 5))
    assert torch.equal(outs[1], 0.5 * (2.0 * z[20:]))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("draws", [1, 4])
@pytest.mark.parametrize("batch", [0, 1, 3, 4, 5, 6, 16])  # the C++ pass takes rows 4 at a time
def test_clip_cpp_equals_reference_bitwise(dtype, draws, batch):
    shapes = [(3, 5, 7), (1,), (4099,), (2, 3, 3, 3)]
    grads = make_grads(batch, shapes, dtype, noncontiguous=batch % 2 == 1, seed=batch)
    c = torch.rand(batch, dtype=torch.float64)
    args = (grads, c, 1.3, 1 / 7, 2**64 - 3, 11, draws)
    cpp = clip_accumulate_noise(*args, backend="cpp")
    ref = clip_accumulate_noise(*args, backend="torch")
    for a, b in zip(cpp, ref, strict=True):
        assert a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL)
def test_clip_keeps_the_sign_of_zero_as_the_reference(backend):
    """torch.equal calls -0.0 equal to 0.0; the contract's acc = 0.0 + c_0 g_0 makes every
    zero sum +0.0, and negative scales flip it: the sign bits must match too."""
    g = torch.tensor([[-0.0, 0.0, -0.0, 1.0], [-0.0, -0.0, 0.0, -1.0]])
    for scale in (0.5, -0.5):
        args = ([g], torch.tensor([1.0, 1.0], dtype=torch.float64), 0.0, scale, 1, 2)
        got = clip_accumulate_noise(*args, backend=backend)[0]
        want = clip_accumulate_noise(*args, backend="torch")[0]
        assert torch.equal(got.signbit(), want.signbit()) and torch.equal(got, want)


@pytest.mark.parametrize("backend", ALL)
def test_clip_offsets_make_calls_composable(backend):
    """Two calls with the right offsets draw the same noise as one call over all tensors."""
    grads = make_grads(4, [(10, 3), (77,), (5,)], torch.float64)
    c = torch.rand(4, dtype=torch.float64)
    whole = clip_accumulate_noise(grads, c, 0.8, 1.0, 5, 6, backend=backend)
    first = clip_accumulate_noise(grads[:1], c, 0.8, 1.0, 5, 6, backend=backend)
    rest = clip_accumulate_noise(grads[1:], c, 0.8, 1.0, 5, 6, offsets=[30, 107], backend=backend)
    for a, b in zip(whole, first + rest, strict=True):
        assert torch.equal(a, b)
    shifted = clip_accumulate_noise(grads[1:], c, 0.8, 1.0, 5, 6, backend=backend)
    assert not torch.equal(shifted[0], whole[1])  # default offsets restart at 0


@needs_cpp
@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(0, 4),
    shapes=st.lists(st.lists(st.integers(1, 9), max_size=3), min_size=1, max_size=4),
    double=st.booleans(),
    draws=st.sampled_from([1, 2, 4]),
    noise_std=st.sampled_from([0.0, 0.7]),
)
def test_hypothesis_cpp_matches_reference(batch, shapes, double, draws, noise_std):
    dtype = torch.float64 if double else torch.float32
    grads = make_grads(batch, [tuple(s) for s in shapes], dtype, seed=len(shapes))
    c = torch.rand(batch, dtype=torch.float64)
    for backend_out in zip(
        *(clip_accumulate_noise(grads, c, noise_std, 3.0, 123, 4, draws, backend=b) for b in ALL),
        strict=True,
    ):
        assert all(torch.equal(backend_out[0], o) for o in backend_out[1:])
    norms = [per_sample_sq_norms(grads, backend=b) for b in ALL]
    for n in norms[1:]:
        torch.testing.assert_close(n, norms[0], rtol=1e-13, atol=0)


@needs_cpp
def test_opcheck_every_registered_op():
    ops = torch.ops.dpseg
    for dtype in (torch.float32, torch.float64):
        for batch in (0, 2, 5):
            grads = make_grads(batch, [(3, 4), (5,), ()], dtype)
            c = torch.rand(batch, dtype=torch.float64)
            torch.library.opcheck(ops.per_sample_sq_norms.default, (grads,))
            for draws in (1, 4):
                args = (grads, c, 0.5, 2.0, -7, 3, draws, [0, 12, 17])
                torch.library.opcheck(ops.clip_accumulate_noise.default, args)
        for numel, offset, draws in ((0, 0, 1), (17, 5, 1), (1000, 2**40, 4)):
            out = torch.empty(numel, dtype=dtype)
            torch.library.opcheck(ops.gaussian_noise_.default, (out, 3, 1, offset, draws))
    counter = torch.randint(0, 2**32, (6, 4))
    key = torch.randint(0, 2**32, (6, 2))
    torch.library.opcheck(ops.philox4x32_10.default, (counter, key))
