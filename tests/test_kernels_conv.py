"""The Triton implicit-GEMM per-sample weight gradient of (transposed) convolutions against
ATen's own weight gradient taken one sample at a time.

fp32 tolerance: rtol 1e-5 relative to the largest entry (the kernel sums the voxels in
BLOCK_K tiles, split-K slices and an atomic order; ATen in its own order; a sum of ~300
products of unit normals carries ~1e-6 relative rounding). Interpreter shapes are tiny
(<= 200 voxels) so the whole file runs in seconds on a CPU.
"""

import pytest
import torch

from tests import triton_env
from tests.triton_env import kernel

triton_device = triton_env.triton_device  # the module's device fixture
no_tf32 = triton_env.no_tf32
pytestmark = pytest.mark.usefixtures("no_tf32")

CASES = [
    # (transposed, batch, cin, cout, spatial, kernel, stride, padding, dilation, groups, outpad)
    (False, 2, 3, 5, (5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1, 0),
    (False, 3, 4, 6, (7, 5, 6), (3, 2, 3), (2, 1, 2), (1, 0, 2), (1, 2, 1), 2, 0),
    (False, 1, 2, 3, (4, 4, 4), (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1), 1, 0),
    (True, 2, 4, 6, (3, 4, 5), (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), 1, 0),
    (True, 2, 4, 6, (3, 4, 3), (3, 2, 3), (2, 1, 2), (1, 0, 1), (1, 2, 1), 2, 1),
    (False, 2, 3, 5, (9,), (3,), (2,), (1,), (2,), 1, 0),
    (False, 2, 4, 4, (6, 7), (3, 3), (1, 2), (1, 1), (1, 1), 4, 0),
    (True, 2, 3, 2, (5, 4), (3, 3), (2, 2), (1, 1), (1, 1), 1, 1),
]


def _problem(case, device, dtype=torch.float32):
    transposed, batch, cin, cout, size, k, stride, padding, dilation, groups, outpad = case
    nd = len(size)
    g = torch.Generator().manual_seed(batch * 31 + cin)
    shape = (cin, cout // groups, *k) if transposed else (cout, cin // groups, *k)
    w = torch.randn(shape, generator=g)
    x = torch.randn(batch, cin, *size, generator=g)
    geometry = (list(stride), list(padding), list(dilation), transposed, [outpad] * nd, groups)
    y = torch.ops.aten.convolution(x, w, None, *geometry)
    go = torch.randn(y.shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (go, x, w)], geometry


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'T' if c[0] else ''}conv{len(c[4])}d")
def test_matches_aten_per_sample(triton_device, case):
    conv = kernel("conv_weight_grad")
    (go, x, w), geometry = _problem(case, triton_device)
    got, norms = conv.per_sample_conv_weight_grad(go, x, w, *geometry, want_norms=True)
    want = conv.per_sample_conv_weight_grad_reference(go, x, w, *geometry)
    assert got.shape == want.shape and got.dtype == w.dtype
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-5)
    want_norms = want.double().flatten(1).square().sum(1)
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("split", [1, 3])
def test_split_k_and_fused_norms_agree(triton_device, split):
    """split=1 takes the fused in-kernel norm, split=3 the atomic split-K and a norm pass."""
    conv = kernel("conv_weight_grad")
    (go, x, w), geometry = _problem(CASES[0], triton_device)
    got, norms = conv.per_sample_conv_weight_grad(go, x, w, *geometry, split=split, want_norms=True)
    want = conv.per_sample_conv_weight_grad_reference(go, x, w, *geometry)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms, want.double().flatten(1).square().sum(1), rtol=1e-5, atol=0)


def test_empty_batch_and_bf16_inputs(triton_device):
    conv = kernel("conv_weight_grad")
    (go, x, w), geometry = _problem(CASES[1], triton_device)
    empty = conv.per_sample_conv_weight_grad(go[:0], x[:0], w, *geometry)
    assert empty.shape == (0, *w.shape)
    # Autocast hands bf16 activations: multiplied in bf16, accumulated in fp32.
    got = conv.per_sample_conv_weight_grad(go.bfloat16(), x.bfloat16(), w, *geometry)
    want = conv.per_sample_conv_weight_grad_reference(
        go.bfloat16().float(), x.bfloat16().float(), w, *geometry
    )
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-5)


def test_strategy_triton_in_the_conv_rule(triton_device, monkeypatch):
    from dpseg.privacy.rules import conv_weight_grad as cwg

    (go, x, w), geometry = _problem(CASES[3], triton_device)
    with cwg.force_strategy("triton"):
        assert cwg.choose_strategy(go, x, w, *geometry) == "triton"
        got = cwg.per_sample_conv_weight_grad(go, x, w, *geometry)
    want = cwg.per_sample_conv_weight_grad(go, x, w, *geometry, strategy="loop")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("DPSEG_CONV_STRATEGY", "triton")
    assert cwg.choose_strategy(go, x, w, *geometry) == "triton"


def test_triton_op_has_a_fake(triton_device):
    """torch.compile / FakeTensor see the op's output metadata without running the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernel("conv_weight_grad")
    with FakeTensorMode():
        go, x = torch.empty(2, 6, 4, 4, 4), torch.empty(2, 4, 6, 6, 6)
        dw, norms = torch.ops.dpseg_triton.per_sample_conv_weight_grad(
            go, x, [6, 2, 3, 3, 3], [1] * 3, [0] * 3, [1] * 3, False, 2, 0, True
        )
    assert dw.shape == (2, 6, 2, 3, 3, 3) and dw.dtype == torch.float32 and norms.shape == (2,)
