"""The per-sample conv backward strategies (loop, grouped, fused, patches) against ATen
itself: each sample's weight gradient from a batch-of-one call, and the batch's input
gradient, on awkward shapes (stride, dilation, groups, padding, odd sizes, transposed,
batch 1, per-dimension geometry)."""

from __future__ import annotations

import pytest
import torch

from dpseg.ops import _ext
from dpseg.privacy.rules.conv_weight_grad import conv_backward_per_sample

CASES = [
    # dims, batch, cin, cout, kernel, stride, padding, dilation, groups, transposed, size
    (3, 2, 3, 5, 3, 1, 1, 1, 1, False, (7, 6, 5)),
    (3, 3, 4, 6, 3, 2, 1, 1, 2, False, (9, 7, 6)),
    (3, 1, 2, 4, 3, 1, 2, 2, 1, False, (8, 7, 9)),  # batch 1, dilation 2
    (2, 5, 6, 6, 3, 2, 0, 1, 3, False, (11, 13)),
    (2, 2, 4, 2, 2, 2, 0, 1, 2, True, (5, 7)),  # transposed, groups
    (3, 3, 4, 3, 2, 2, 1, 1, 1, True, (3, 4, 5)),
    (1, 4, 3, 3, 5, 3, 2, 1, 1, False, (23,)),
    (3, 7, 1, 8, 3, 1, 1, 1, 1, False, (5, 5, 5)),  # Cin = 1, an odd batch
    (3, 2, 1, 4, 3, 2, 2, 2, 1, False, (9, 8, 7)),  # Cin = 1, stride 2, dilation 2
    (2, 3, 2, 5, (2, 3), 1, 1, 1, 1, False, (6, 7)),  # a non-square kernel
    (2, 2, 1, 3, (3, 2), (1, 2), (0, 2), (2, 1), 1, False, (9, 8)),  # per-dim geometry
    (3, 2, 80, 3, 1, 1, 0, 1, 1, False, (4, 5, 3)),  # a wide 1x1x1 head: patches are x
    (3, 3, 5, 70, 1, 1, 0, 1, 1, True, (3, 4, 5)),  # a wide transposed 1x1x1
    (2, 2, 70, 4, 1, 2, 0, 1, 1, False, (7, 6)),  # 1x1, stride 2: patches subsample x
]


def _aten(go, x, w, geometry, need):
    return torch.ops.aten.convolution_backward(go, x, w, None, *geometry, [need, True, False])


@pytest.mark.parametrize("strategy", ["loop", "grouped", "fused", "patches", "direct", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_strategy_matches_aten_per_sample(case, strategy):
    dims, batch, cin, cout, k, stride, pad, dil, groups, transposed, size = case
    if strategy in ("patches", "direct") and groups != 1:
        pytest.skip(f"{strategy} is for ungrouped convolutions")
    if strategy == "direct" and not _ext.has_op("conv_weight_grad_per_sample"):
        pytest.skip("C++ extension without the op")
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    x = torch.randn(batch, cin, *size, generator=g, dtype=torch.float64)
    kernel = list(k) if isinstance(k, tuple) else [k] * dims
    if transposed:
        w = torch.randn(cin, cout // groups, *kernel, generator=g, dtype=torch.float64)
    else:
        w = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=torch.float64)
    per_dim = [list(v) if isinstance(v, tuple) else [v] * dims for v in (stride, pad, dil)]
    out_pad = [s - 1 if transposed and s > 1 else 0 for s in per_dim[0]]
    geometry = (*per_dim, transposed, out_pad, groups)
    out = torch.ops.aten.convolution(x, w, None, *geometry)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for need in (True, False):
        gi, gw = conv_backward_per_sample(go, x, w, geometry, need, strategy=strategy)
        want = torch.stack(
            [_aten(go[b : b + 1], x[b : b + 1], w, geometry, False)[1] for b in range(batch)]
        )
        torch.testing.assert_close(gw, want, rtol=1e-10, atol=1e-10)
        if need:
            torch.testing.assert_close(
                gi, _aten(go, x, w, geometry, True)[0], rtol=1e-10, atol=1e-10
            )
        else:
            assert gi is None


def _timed_strategies(go, x, w, geometry) -> set[str]:
    """The candidates auto times for this layer (the timing itself stubbed out: it picks
    "patches"), with the choice cache emptied before and after."""
    from dpseg.privacy.rules import conv_weight_grad as cwg

    timed = {}
    real = cwg._fastest
    cwg._choice_cache.clear()
    try:
        cwg._fastest = lambda candidates, device: timed.update(candidates) or "patches"
        assert cwg.choose_strategy(go, x, w, *geometry) == "patches"
    finally:
        cwg._fastest = real
        cwg._choice_cache.clear()
    return set(timed)


def test_patches_refuse_a_transposed_or_grouped_conv_and_auto_times_them_on_cin_1():
    from dpseg.privacy.rules import conv_weight_grad as cwg

    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 2, 3, 3)
    geometry = ([1, 1], [1, 1], [1, 1], False, [0, 0], 2)
    go = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="ungrouped convolutions"):
        cwg.per_sample_conv_weight_grad(go, x, w, *geometry, strategy="patches")
    with cwg.force_strategy("patches"):  # forced on a grouped conv: the exact loop instead
        assert cwg.choose_strategy(go, x, w, *geometry) == "loop"
    # a one-channel 3x3x3 input layer is large enough to be timed: patches are a candidate
    x, w = torch.randn(2, 1, 48, 48, 48), torch.randn(16, 1, 3, 3, 3)
    geometry = ([1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)
    go = torch.randn(2, 16, 48, 48, 48)
    assert cwg._patches_fit(go, x, w, *geometry)
    assert not cwg._patches_fit(go, x, torch.randn(16, 16, 3, 3, 3), *geometry)
    direct = {"direct"} if _ext.has_op("conv_weight_grad_per_sample") else set()
    assert _timed_strategies(go, x, w, geometry) == {"loop", "grouped", "patches"} | direct


def test_a_wide_pointwise_conv_times_patches_but_not_the_direct_kernel():
    """A 1x1x1 conv's patches are its input (no copy at any width), so auto times them; the
    direct kernel would do a matmul's work as dot products, so it is not timed there."""
    from dpseg.privacy.rules import conv_weight_grad as cwg

    x, w = torch.randn(2, 96, 24, 24, 24), torch.randn(16, 96, 1, 1, 1)
    geometry = ([1] * 3, [0] * 3, [1] * 3, False, [0] * 3, 1)
    go = torch.randn(2, 16, 24, 24, 24)
    assert cwg._patches_fit(go, x, w, *geometry) and not cwg._direct_usable(go, x, w, geometry)
    operands = cwg._plain_operands("patches", go, x, w, *geometry)
    assert operands[1].data_ptr() == x.data_ptr()  # no padding: x itself, not a copy
    assert _timed_strategies(go, x, w, geometry) == {"loop", "grouped", "patches"}


def test_empty_batch():
    x = torch.randn(0, 2, 5, 5, 5)
    w = torch.randn(3, 2, 3, 3, 3)
    go = torch.randn(0, 3, 3, 3, 3)
    geometry = ([1] * 3, [0] * 3, [1] * 3, False, [0] * 3, 1)
    gi, gw = conv_backward_per_sample(go, x, w, geometry, True, strategy="fused")
    assert gi.shape == x.shape and gw.shape == (0, *w.shape)


def _case_tensors(case):
    dims, batch, cin, cout, k, stride, pad, dil, groups, transposed, size = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    x = torch.randn(batch, cin, *size, generator=g, dtype=torch.float64)
    kernel = list(k) if isinstance(k, tuple) else [k] * dims
    shape = (cin, cout // groups) if transposed else (cout, cin // groups)
    w = torch.randn(*shape, *kernel, generator=g, dtype=torch.float64)
    per_dim = [list(v) if isinstance(v, tuple) else [v] * dims for v in (stride, pad, dil)]
    out_pad = [s - 1 if transposed and s > 1 else 0 for s in per_dim[0]]
    geometry = (*per_dim, transposed, out_pad, groups)
    go = torch.randn(torch.ops.aten.convolution(x, w, None, *geometry).shape, generator=g,
                     dtype=torch.float64)  # fmt: skip
    return go, x, w, geometry


STRIDE_1 = [
    (3, 2, 4, 6, 3, 1, 1, 1, 2, False, (6, 5, 7)),  # groups
    (2, 3, 2, 5, (3, 5), 1, (1, 2), (2, 1), 1, False, (9, 8)),  # per-dim padding, dilation
    (1, 2, 3, 4, 4, 1, 0, 1, 1, False, (11,)),  # an even kernel, no padding
    (3, 2, 2, 2, 1, 1, 0, 1, 1, False, (4, 5, 6)),  # 1x1x1
]


@pytest.mark.parametrize("case", CASES + STRIDE_1)
def test_input_grad_as_a_forward_conv_matches_aten(case):
    """The input gradient as a forward conv (flipped kernel; of a transposed conv, the conv
    itself) against ATen's backward-data, wherever it applies; and where it does not
    (strided, or padding beyond the kernel's reach), the chooser keeps backward-data."""
    from dpseg.privacy.rules import conv_weight_grad as cwg

    go, x, w, geometry = _case_tensors(case)
    want = _aten(go, x, w, geometry, True)[0]
    if cwg._forward_input_grad_fits(go, x, w, *geometry):
        got = cwg._input_grad_by_forward(go, x, w, *geometry)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    else:
        assert not geometry[3] and (max(geometry[0]) > 1 or max(geometry[1]) > 0)
        assert cwg.choose_input_grad(go, x, w, *geometry) == "backward"
    torch.testing.assert_close(cwg.conv_input_grad(go, x, w, *geometry), want, rtol=1e-10,
                               atol=1e-10)  # fmt: skip


def test_input_grad_choice_is_timed_once_per_shape_and_used_by_the_rule():
    from dpseg.privacy.rules import conv_weight_grad as cwg

    x, w = torch.randn(2, 2, 40, 40, 40), torch.randn(2, 2, 3, 3, 3)
    go = torch.randn(2, 2, 40, 40, 40)
    geometry = ([1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)
    timed = []
    real = cwg._fastest
    cwg._input_grad_cache.clear()
    try:
        cwg._fastest = lambda candidates, device: timed.append(sorted(candidates)) or "forward"
        for _ in range(2):
            assert cwg.choose_input_grad(go, x, w, *geometry) == "forward"
        assert timed == [["backward", "forward"]]  # timed once, then cached
        with cwg.force_strategy("grouped"):
            gi, _ = conv_backward_per_sample(go, x, w, geometry, True)
        torch.testing.assert_close(gi, _aten(go, x, w, geometry, True)[0], rtol=1e-4, atol=1e-4)
        # a strided conv's input gradient is not a plain forward conv: never a candidate
        assert cwg.choose_input_grad(go[..., ::2, ::2, ::2], x, w, [2] * 3, *geometry[1:]) == (
            "backward"
        )
    finally:
        cwg._fastest = real
        cwg._input_grad_cache.clear()


def test_input_grad_forced_by_the_environment(monkeypatch):
    from dpseg.privacy.rules import conv_weight_grad as cwg

    x, w, go = torch.randn(2, 2, 6, 6, 6), torch.randn(3, 2, 3, 3, 3), torch.randn(2, 3, 6, 6, 6)
    geometry = ([1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)
    for name in ("forward", "backward"):
        monkeypatch.setenv("DPSEG_CONV_INPUT_GRAD", name)
        assert cwg.choose_input_grad(go, x, w, *geometry) == name
    monkeypatch.setenv("DPSEG_CONV_INPUT_GRAD", "forward")  # where it does not apply
    assert cwg.choose_input_grad(go[..., ::2, ::2, ::2], x, w, [2] * 3, *geometry[1:]) == (
        "backward"
    )
    monkeypatch.setenv("DPSEG_CONV_INPUT_GRAD", "sideways")
    with pytest.raises(ValueError, match="DPSEG_CONV_INPUT_GRAD='sideways'"):
        cwg.choose_input_grad(go, x, w, *geometry)


def test_patches_of_a_transposed_conv_need_its_adjoint_to_fit():
    from dpseg.privacy.rules import conv_weight_grad as cwg

    # stride 2, dilation 3, output padding 2: the conv of go gives one more position than x
    x, w = torch.randn(2, 3, 5, 5), torch.randn(3, 2, 3, 3)
    geometry = ([2, 2], [1, 1], [3, 3], True, [2, 2], 1)
    go = torch.randn(torch.ops.aten.convolution(x, w, None, *geometry).shape)
    assert not cwg._patches_fit(go, x, w, *geometry)
    with pytest.raises(ValueError, match="output padding reaches its stride"):
        cwg.per_sample_conv_weight_grad(go, x, w, *geometry, strategy="patches")
    with cwg.force_strategy("patches"):
        assert cwg.choose_strategy(go, x, w, *geometry) == "loop"
    assert cwg.choose_input_grad(go, x, w, *geometry) == "backward"
    gi, gw = conv_backward_per_sample(go, x, w, geometry, True)  # still exact
    want = torch.stack([_aten(go[b : b + 1], x[b : b + 1], w, geometry, False)[1] for b in (0, 1)])
    torch.testing.assert_close(gw, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gi, _aten(go, x, w, geometry, True)[0], rtol=1e-4, atol=1e-4)


needs_direct = pytest.mark.skipif(
    not _ext.has_op("conv_weight_grad_per_sample"), reason="C++ extension without the op"
)


@needs_direct
def test_direct_kernel_same_bits_on_any_thread_count_and_float32_close_to_float64():
    """The direct kernel's float32 result against the float64 loop (float lanes over a
    plane, added in double), and bit-identical on 1, 2 and 3 threads (fixed lane order)."""
    from dpseg.privacy.rules import conv_weight_grad as cwg

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 13, 17, 19, generator=g)
    w = torch.randn(5, 2, 3, 3, 3, generator=g)
    for stride in ([1, 1, 1], [2, 1, 1], [1, 2, 3]):
        geometry = (stride, [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1)
        go = torch.randn(torch.ops.aten.convolution(x, w, None, *geometry).shape, generator=g)
        want = cwg._loop(go.double(), x.double(), w.double(), *geometry)
        threads, runs = torch.get_num_threads(), []
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                runs.append(cwg._direct(go, x, w, *geometry))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(runs[0], r) for r in runs[1:])
        torch.testing.assert_close(runs[0].double(), want, rtol=1e-5, atol=1e-4)


@needs_direct
def test_direct_kernel_opcheck_and_bad_inputs():
    go, x = (
        torch.randn(2, 3, 4, 4, 4, dtype=torch.float64),
        torch.randn(2, 1, 6, 6, 6, dtype=torch.float64),
    )
    args = (go, x, [3, 3, 3], [1, 1, 1], [1, 1, 1])
    torch.library.opcheck(torch.ops.dpseg.conv_weight_grad_per_sample.default, args)
    with pytest.raises(RuntimeError, match="the padded input gives 3 positions"):
        torch.ops.dpseg.conv_weight_grad_per_sample(go, x, [4, 3, 3], [1, 1, 1], [1, 1, 1])
    with pytest.raises(RuntimeError, match="must be 5-D"):
        torch.ops.dpseg.conv_weight_grad_per_sample(go[0], x, [3, 3, 3], [1, 1, 1], [1, 1, 1])
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.dpseg.conv_weight_grad_per_sample(go.float(), x, [3, 3, 3], [1, 1, 1], [1, 1, 1])


@needs_direct
def test_direct_kernel_edges_no_positions_and_an_unused_infinite_input():
    """No output positions: zeros, and nothing read past the input. An inf in an input
    column that no tap uses (dilation 3 in x skips it) leaves the gradient finite, as the
    other strategies do."""
    from dpseg.privacy.rules import conv_weight_grad as cwg

    buf = torch.full((8,), float("nan"))
    x = buf[:2].view(1, 1, 1, 2, 1)
    out = torch.ops.dpseg.conv_weight_grad_per_sample(
        torch.empty(1, 1, 1, 2, 0), x, [1, 1, 3], [1, 1, 1], [1, 1, 1]
    )
    assert torch.equal(out, torch.zeros(1, 1, 1, 1, 1, 3))
    x = torch.randn(2, 1, 6, 5)
    x[..., 2] = float("inf")  # width 5, kernel 2 with dilation 3: column 2 is never read
    w = torch.randn(1, 1, 2, 2)
    geometry = ([1, 1], [0, 0], [1, 3], False, [0, 0], 1)
    go = torch.randn(torch.ops.aten.convolution(x, w, None, *geometry).shape)
    got = cwg._direct(go, x, w, *geometry)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, cwg._loop(go, x, w, *geometry), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["loop", "grouped", "fused", "patches", "auto"])
@pytest.mark.parametrize("transposed", [True, False])
def test_a_channels_last_input_of_one_position_is_read_as_contiguous(strategy, transposed):
    """A channels-last (B, C, 1, 1) tensor passes PyTorch's contiguity test with its strides
    kept; folded into one batch of groups, oneDNN read it as channels-last and refused
    ("grad_weight needs to be contiguous": SwinUNETR 2-D at a 1x1 bottleneck)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, 1, 1, generator=g, dtype=torch.float64)
    x = x.to(memory_format=torch.channels_last)
    assert x.is_contiguous() and x.stride() != (8, 1, 1, 1)
    if transposed:
        w = torch.randn(8, 4, 2, 2, generator=g, dtype=torch.float64)
        geometry = ([2, 2], [0, 0], [1, 1], True, [0, 0], 1)
    else:
        w = torch.randn(4, 8, 1, 1, generator=g, dtype=torch.float64)
        geometry = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    go = torch.randn(torch.ops.aten.convolution(x, w, None, *geometry).shape, generator=g,
                     dtype=torch.float64).to(memory_format=torch.channels_last)  # fmt: skip
    gi, gw = conv_backward_per_sample(go, x, w, geometry, True, strategy=strategy)
    per_sample = [_aten(go[b : b + 1], x[b : b + 1], w, geometry, False)[1] for b in range(3)]
    torch.testing.assert_close(gw, torch.stack(per_sample), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gi, _aten(go, x, w, geometry, True)[0], rtol=1e-10, atol=1e-10)
