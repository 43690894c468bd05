"""Triton multi-tensor ops (dpseg.kernels) against the pure-PyTorch reference: noise and the
clipped sum bit for bit (torch.equal), norms to float64 rounding, the fused optimizer update
to torch.optim within float32 ulps. On the CPU these run under TRITON_INTERPRET=1 with
small shapes (a few seconds); on a GPU the same tests run compiled."""

import math

import pytest
import torch

from dpseg.ops import clip_accumulate_noise, gaussian_noise, per_sample_sq_norms
from tests import triton_env
from tests.triton_env import kernel

triton_device = triton_env.triton_device  # the module's device fixture

# Awkward on purpose: scalar, unit dims, one element, a tensor over one chunk (512).
SHAPES = [(3, 5, 7), (), (1,), (2, 1, 3, 1), (600,)]


def make_grads(batch, shapes, dtype, device, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        t = torch.randn((batch, *s, 2) if noncontiguous else (batch, *s), generator=g)
        t = (t[..., 0] if noncontiguous else t) * (1 + i)
        out.append(t.to(dtype=dtype, device=device))
    return out


@pytest.mark.parametrize("draws", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_bitwise_the_reference(triton_device, draws, dtype):
    # Odd and even offsets: with draws == 1 a program's lanes pair up elements 2q, 2q + 1.
    for seed, step, offset in [(0, 0, 0), (2**64 - 3, 2**40 + 7, 12345), (1, 1, 2**33)]:
        kw = dict(draws=draws, dtype=dtype, device=triton_device)
        got = gaussian_noise(700, seed, step, offset, backend="triton", **kw)
        want = gaussian_noise(700, seed, step, offset, backend="torch", **kw)
        assert torch.equal(got, want)


@pytest.mark.parametrize("batch", [0, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sq_norms_match_reference(triton_device, batch, dtype):
    grads = make_grads(batch, SHAPES, dtype, triton_device, noncontiguous=batch == 5)
    got = per_sample_sq_norms(grads, backend="triton")
    assert got.dtype == torch.float64 and got.shape == (batch,)
    want = kernel("per_sample_sq_norms").per_sample_sq_norms_reference(grads)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("draws", [1, 4])
@pytest.mark.parametrize("batch", [0, 1, 4])
def test_clip_accumulate_noise_is_bitwise_the_reference(triton_device, draws, batch):
    # float32 and float64 tensors in one call: two launches, one noise stream.
    grads = make_grads(batch, SHAPES, torch.float32, triton_device, seed=batch)
    grads[1] = grads[1].double()
    c = torch.rand(batch, dtype=torch.float64).to(triton_device)
    args = (grads, c, 1.3, 1 / 7, 2**64 - 3, 11, draws)
    got = clip_accumulate_noise(*args, backend="triton")
    want = clip_accumulate_noise(*args, backend="torch")
    for a, b, g in zip(got, want, grads, strict=True):
        assert a.dtype == g.dtype and a.shape == g.shape[1:] and torch.equal(a, b)


def test_clip_without_noise_and_with_offsets(triton_device):
    grads = make_grads(3, [(10, 3), (77,), (5,)], torch.float64, triton_device)
    c = torch.rand(3, dtype=torch.float64).to(triton_device)
    no_noise = clip_accumulate_noise(grads, c, 0.0, 0.5, 1, 2, backend="triton")
    for got, g in zip(no_noise, grads, strict=True):
        torch.testing.assert_close(got, 0.5 * torch.einsum("b,b...->...", c, g), rtol=1e-14, atol=0)
    whole = clip_accumulate_noise(grads, c, 0.8, 1.0, 5, 6, backend="triton")
    rest = clip_accumulate_noise(grads[1:], c, 0.8, 1.0, 5, 6, offsets=[30, 107], backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(whole[1:], rest, strict=True))


@pytest.mark.parametrize(
    "hyper",
    [
        dict(momentum=0.0),
        dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
        dict(momentum=0.9, nesterov=True, maximize=True),
    ],
)
def test_fused_sgd_update_matches_torch_optim(triton_device, hyper):
    update = kernel("clip_noise_update")
    shapes = [(4, 3, 3), (5,), (130,)]
    grads = make_grads(3, shapes, torch.float32, triton_device, seed=3)
    c = torch.rand(3, dtype=torch.float64).to(triton_device)
    params = make_grads(1, shapes, torch.float32, triton_device, seed=9)
    params = [p[0] for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    ref_params, ref_bufs = [p.clone() for p in params], [b.clone() for b in bufs]
    noise = dict(noise_std=0.7, scale=0.25, seed=5, step=3, lr=0.1)
    for first in (True, False):  # the first step initialises the momentum buffer
        got = update.clip_noise_sgd_(params, grads, bufs, c, **noise, **hyper, first_step=first)
        want = update.clip_noise_sgd_reference(
            ref_params, grads, ref_bufs, c, **noise, **hyper, first_step=first
        )
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))  # the DP grads
        for a, b in zip(params + bufs, ref_params + ref_bufs, strict=True):
            torch.testing.assert_close(a, b, rtol=4e-7, atol=1e-7)


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_adam_update_matches_torch_optim(triton_device, decoupled):
    update = kernel("clip_noise_update")
    shapes = [(4, 3, 3), (5,), (130,)]
    grads = make_grads(2, shapes, torch.float32, triton_device, seed=4)
    c = torch.rand(2, dtype=torch.float64).to(triton_device)
    params = [p[0] for p in make_grads(1, shapes, torch.float32, triton_device, seed=8)]
    m = [p[0] * 0.1 for p in make_grads(1, shapes, torch.float32, triton_device, seed=6)]
    v = [p[0].abs() * 0.01 for p in make_grads(1, shapes, torch.float32, triton_device, seed=7)]
    ref = [[t.clone() for t in ts] for ts in (params, m, v)]
    kw = dict(noise_std=0.7, scale=0.5, seed=5, step=3, lr=0.01, weight_decay=0.1,
              decoupled_weight_decay=decoupled, optimizer_step=3)  # fmt: skip
    update.clip_noise_adam_(params, grads, m, v, c, **kw)
    update.clip_noise_adam_reference(ref[0], grads, ref[1], ref[2], c, **kw)
    # ATen's AVX kernels contract lerp / addcmul into FMAs: a few ulps of the gradient (~1),
    # which is 6e-8 absolute, can remain where the result is small.
    for a, b in zip(params + m + v, ref[0] + ref[1] + ref[2], strict=True):
        torch.testing.assert_close(a, b, rtol=4e-7, atol=6e-8)


def test_ops_compose_with_torch_library(triton_device):
    """Fakes give the output metadata without running the kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g = [torch.empty(3, 4, 5), torch.empty(3, 7)]
        norms = torch.ops.dpseg_triton.per_sample_sq_norms(g)
        flat = torch.ops.dpseg_triton.clip_accumulate_noise_flat(
            g, torch.empty(3, dtype=torch.float64), 1.0, 1.0, 1, 2, 1, [0, 20]
        )
    assert norms.shape == (3,) and norms.dtype == torch.float64
    assert flat.shape == (math.prod((4, 5)) + 7,)


needs_cpp_update = pytest.mark.skipif(
    not __import__("dpseg.ops._ext", fromlist=["has_op"]).has_op("clip_accumulate_noise_sgd_"),
    reason="C++ extension without the fused update ops",
)


@needs_cpp_update
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_cpp_fused_update_ops_match_torch_optim(triton_device, optimizer):
    """The CPU impls of the CUDA-fused update ops (the CUDA kernels' reference): bitwise
    torch.optim, as they make torch.optim's own ATen calls."""
    update = kernel("clip_noise_update")
    shapes = [(4, 3, 3), (5,), (130,)]
    grads = make_grads(3, shapes, torch.float32, "cpu", seed=3)
    c = torch.rand(3, dtype=torch.float64)
    params = [p[0] for p in make_grads(1, shapes, torch.float32, "cpu", seed=9)]
    states = [[torch.rand_like(p) * 0.01 for p in params] for _ in range(2)]
    ref = [[t.clone() for t in ts] for ts in (params, *states)]
    offsets = [0, 36, 41]
    noise = (0.7, 0.25, 5, 3, 1, offsets)
    if optimizer == "sgd":
        got = torch.ops.dpseg.clip_accumulate_noise_sgd_(
            params, states[0], grads, c, *noise, 0.1, 0.9, 0.1, 0.01, True, False, False
        )
        want = update.clip_noise_sgd_reference(
            ref[0], grads, ref[1], c, noise_std=0.7, scale=0.25, seed=5, step=3, lr=0.1,
            momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True,
        )  # fmt: skip
        pairs = zip(params + states[0], ref[0] + ref[1], strict=True)
    else:
        decoupled = optimizer == "adamw"
        got = torch.ops.dpseg.clip_accumulate_noise_adam_(
            params, states[0], states[1], grads, c, *noise, 0.01, 0.9, 0.999, 1e-8, 0.1,
            decoupled, False, 2,
        )  # fmt: skip
        want = update.clip_noise_adam_reference(
            ref[0], grads, ref[1], ref[2], c, noise_std=0.7, scale=0.25, seed=5, step=3,
            lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled, optimizer_step=2,
        )  # fmt: skip
        pairs = zip(params + states[0] + states[1], ref[0] + ref[1] + ref[2], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(torch.equal(a, b) for a, b in pairs)
