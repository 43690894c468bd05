"""Per-sample weight gradients of (transposed) convolutions, computed as convolutions.

Never by unfolding the input: Opacus's unfold3d materialises 27x the activation per sample
for a 3x3x3 kernel (615 ms for B=2, 16->16 ch, 64^3 on this project's 2-core CPU). Both
strategies here are ATen's own weight-gradient kernel (oneDNN on CPU, cuDNN on GPU):

``loop``     one weight-gradient call per sample (batch of one).
``grouped``  one call on the batch folded into channels: input (1, B*Cin, ...), grad_out
             (1, B*Cout, ...), groups = B*groups, so group b is exactly sample b's gradient.

Neither wins everywhere. Measured on the 2-core CPU (torch 2.13, fp32, B=2, 3x3x3):
  16->16 @ 64^3: loop 62 ms, grouped 77 ms   (batched non-private weight grad: 75 ms)
   1->16 @ 64^3: loop 84 ms, grouped 54 ms   (batched: 20 ms; oneDNN is poor at Cin=1, N=1)
  32->32 @ 32^3: loop 25 ms, grouped 22 ms   (batched: 21 ms)
  64->64 @ 16^3: loop 45 ms, grouped 11 ms   (batched: 10 ms)
At small patches the best per-sample strategy still costs more than the batched gradient
(B=8, idle CPU: 24->8 @ 16^3 grouped 13.5 ms vs batched 8.5 ms; 48->16 @ 8^3 2.1 vs 1.3 ms),
which was most of the 1.29x DP step of the 16^3 federated demo (0.97x at 64^3). ``fused``
closes most of it: input and weight gradients of one layer, 2 threads, against the batched
non-private call (both gradients):
  B=8,   24->8 @ 16^3: batched 9.2 ms, input + grouped 12.6 ms, fused 10.1 ms
  B=8,   48->16 @ 8^3: batched 1.4 ms, input + grouped 1.6 ms,  fused 1.6 ms
  B=128,  8->8 @ 48^2: batched 26.2 ms, input + grouped 26.9 ms, fused 19.6 ms (the demo's)
The whole DP step (dpseg bench): U-Net 8-16-32 at 16^3, B=8: 1.04x; the demo's 2-D U-Net at
48^2, B=128: 0.95x (Opacus hooks 1.75x).
``auto`` times both once per shape and power-of-two batch bucket (second call, after
oneDNN built its primitive) and caches the winner for the process. Small problems skip
the timing and take ``grouped``.

``fused``    the grouped call asked for the input gradient too: the repeated weight makes each
             group sample b's own convolution, so its input gradient, reshaped, is the
             batch's. One oneDNN call per layer instead of two: at small shapes the call, not
             the arithmetic, is the cost (60 3x3x3 convs 4->4 at 8^3, B=2, 2 threads: 150 us a
             convolution_backward call). Only when the input gradient is wanted.
``patches``  one batched matmul of the output gradient with the input's patches, for a layer
             with few input floats per output position (``_PATCH_FLOATS``: a network's
             first conv on a one-channel image). oneDNN is at its worst there: SegResNet's
             1->16 3x3x3 layer at 48^3, B=2, 2 threads (AVX-512): loop 7.2 ms, grouped
             8.4 ms, patches 5.0 ms, the batched non-private weight gradient 2.5 ms.
             A transposed conv's through its adjoint (the conv of go with the same weight).
             A 1x1x1 conv of any width too: its patches are the input itself, a view.
``direct``   dpseg's C++ kernel for the same layers (CPU): each output row against the
             shifted input rows, per (sample, output channel), nothing materialised. MONAI
             UNet's last 2->2 conv at 48^3: 1.1 ms (grouped 3.9, batched 3.2).

The input gradient, when wanted, is itself chosen by timing (``choose_input_grad``):
ATen's backward-data kernel, or the same gradient as a forward convolution (flipped kernel;
of a transposed conv, the conv itself). oneDNN's backward-data has a ~20 ms floor for
few-channel layers at 48^3 that its forward kernel does not (2->2: 20 against 2.7 ms).
Ordinary autograd pays that floor; so the DP step can be faster than the non-private one on
such a layer (MONAI's UNet: its last conv 22.5 ms non-private, 4.7 ms in the DP step).
``bench/conv_input_grad.py`` times both on such layers.
``triton``   dpseg.kernels.conv_weight_grad: an implicit GEMM split over voxels, one launch
             for the whole batch. ``auto`` times it beside the other two on CUDA tensors; on
             CPU tensors (TRITON_INTERPRET=1) it runs only when forced -- by
             DPSEG_CONV_STRATEGY=triton or ``force_strategy("triton")`` -- as the
             interpreter is a test vehicle, not a fast path.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence

import torch

from dpseg.privacy.ranges import profiled

STRATEGIES = ("loop", "grouped", "fused", "patches", "direct", "triton")
_aten_conv_backward = torch.ops.aten.convolution_backward
_choice_cache: dict[tuple, str] = {}
# Below this many grad_out elements the call costs microseconds; timing it costs more.
_TIMING_THRESHOLD = 1 << 17


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of a fresh contiguous tensor. ``contiguous()`` is not enough:
    a channels-last tensor whose spatial sizes are all 1 is contiguous by PyTorch's test but
    keeps its strides, a batch-folded reshape of it carries them on, and oneDNN then reads
    the grouped call as channels-last and refuses it ("grad_weight needs to be contiguous":
    SwinUNETR 2-D at its 1x1 bottleneck)."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _weight_grad(go, x, w, stride, padding, dilation, transposed, output_padding, groups):
    return _aten_conv_backward(
        go,
        x,
        w,
        None,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
        [False, True, False],
    )[1]


def _loop(go, x, w, *geometry):
    out = w.new_empty((x.shape[0], *w.shape))
    for b in range(x.shape[0]):
        out[b] = _weight_grad(go[b : b + 1], x[b : b + 1], w, *geometry)
    return out


def _grouped(go, x, w, stride, padding, dilation, transposed, output_padding, groups):
    return _grouped_both(
        go, x, w, stride, padding, dilation, transposed, output_padding, groups, False
    )[1]


def _grouped_both(go, x, w, stride, padding, dilation, transposed, output_padding, groups, gi):
    """(input gradient if ``gi``, per-sample weight gradient) from one grouped call."""
    batch = x.shape[0]
    x_g = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    go_g = go.reshape(1, batch * go.shape[1], *go.shape[2:])
    # The weight repeated per sample: group b is sample b's own convolution (B*P floats).
    w_g = w.repeat(batch, *([1] * (w.dim() - 1)))
    grad_input, g, _ = _aten_conv_backward(
        go_g, x_g, w_g, None, stride, padding, dilation, transposed, output_padding,
        batch * groups, [gi, True, False],
    )  # fmt: skip
    if grad_input is not None:
        grad_input = grad_input.view(x.shape)
    return grad_input, g.view(batch, *w.shape)


def _input_grad(go, x, w, stride, padding, dilation, transposed, output_padding, groups):
    """The input gradient by ATen's backward-data kernel (what ordinary autograd calls)."""
    return _aten_conv_backward(
        go, x, w, None, stride, padding, dilation, transposed, output_padding, groups,
        [True, False, False],
    )[0]  # fmt: skip


def _input_grad_by_forward(go, x, w, stride, padding, dilation, transposed, output_padding, groups):
    """The same input gradient as a forward convolution of ``go``. Of a transposed conv it is
    the conv itself (same weight, stride, padding); of a stride-1 conv, the conv with the
    kernel flipped, in and out channels swapped per group, and padding d (k - 1) - p.

    Why: oneDNN's backward-data kernel has a floor for few-channel layers that its forward
    kernel does not. At 48^3, B=2, 2 threads (AVX-512): a 2->2 3x3x3 conv's input gradient
    takes 20 ms by backward-data, 2.7 ms as this forward (the forward itself: 3.3 ms); 4->4
    19.6 against 5.3, 8->8 20.2 against 9.8, 16->16 20.5 against 20.3 (no gain: both are
    the plain kernel there). The timed choice (``choose_input_grad``) keeps whichever wins."""
    nd = w.dim() - 2
    if transposed:
        return torch.ops.aten.convolution(
            go, w, None, stride, padding, dilation, False, [0] * nd, groups
        )
    cout, cin_group, kernel = w.shape[0], w.shape[1], w.shape[2:]
    flipped = (
        w.view(groups, cout // groups, cin_group, *kernel)
        .transpose(1, 2)
        .reshape(groups * cin_group, cout // groups, *kernel)
        .flip(tuple(range(2, 2 + nd)))
    )
    pad = [d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding, strict=True)]
    return torch.ops.aten.convolution(
        go, flipped, None, [1] * nd, pad, dilation, False, [0] * nd, groups
    )


def _forward_input_grad_fits(go, x, w, stride, padding, dilation, transposed, output_padding,
                             groups) -> bool:  # fmt: skip
    """Whether ``_input_grad_by_forward`` applies: a transposed conv whose forward gives back
    x's size (not when an output_padding reaches the stride), or a stride-1 conv whose
    padding is at most the kernel's reach (the flipped conv's padding is not negative)."""
    kernel = w.shape[2:]
    if transposed:
        reach = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        size = [
            (n + 2 * p - r - 1) // s + 1
            for n, p, r, s in zip(go.shape[2:], padding, reach, stride, strict=True)
        ]
        return size == list(x.shape[2:])
    return all(s == 1 for s in stride) and all(
        d * (k - 1) >= p for d, k, p in zip(dilation, kernel, padding, strict=True)
    )


_input_grad_cache: dict[tuple, str] = {}
# name -> (the input gradient, whether it applies to a layer; backward-data always does)
_INPUT_GRADS = {
    "backward": (_input_grad, lambda *args: True),
    "forward": (_input_grad_by_forward, _forward_input_grad_fits),
}


def choose_input_grad(go, x, w, *geometry) -> str:
    """How this layer shape's input gradient is computed: "backward" (ATen's backward-data)
    or "forward" (``_input_grad_by_forward``), timed once per shape and batch bucket as the
    weight strategies are, unless DPSEG_CONV_INPUT_GRAD names one (where it applies;
    backward-data where it does not)."""
    fitting = [name for name, (_, fits) in _INPUT_GRADS.items() if fits(go, x, w, *geometry)]
    forced = os.environ.get("DPSEG_CONV_INPUT_GRAD")  # to measure one against another
    if forced:
        if forced not in _INPUT_GRADS:
            raise ValueError(f"DPSEG_CONV_INPUT_GRAD={forced!r}; use one of {sorted(_INPUT_GRADS)}")
        return forced if forced in fitting else "backward"
    key = (
        x.shape[0].bit_length(), tuple(x.shape[1:]), tuple(go.shape[1:]), tuple(w.shape),
        x.dtype, x.device.type, *map(str, geometry),
    )  # fmt: skip
    choice = _input_grad_cache.get(key)
    if choice is None:
        if len(fitting) == 1 or go.numel() < _TIMING_THRESHOLD:
            choice = "backward"
        else:
            choice = _fastest(
                {
                    name: (lambda fn=_INPUT_GRADS[name][0]: fn(go, x, w, *geometry))
                    for name in fitting
                },
                x.device,
            )
        _input_grad_cache[key] = choice
    return choice


def conv_input_grad(go, x, w, *geometry) -> torch.Tensor:
    """The conv's input gradient by the fastest method that applies (``choose_input_grad``)."""
    return _INPUT_GRADS[choose_input_grad(go, x, w, *geometry)][0](go, x, w, *geometry)


def _patches(go, x, w, stride, padding, dilation, transposed, output_padding, groups):
    """Per-sample weight gradient as one batched matmul over the input's patches: (B, Cout,
    positions) @ (B, positions, Cin x kernel). It materialises Cin x kernel floats per output
    position, which is what Opacus's unfold pays at every layer; dpseg takes it only where
    that is small (``_patches_fit``: a network's first layer on a one-channel image, where
    oneDNN's per-sample weight gradient is at its worst)."""
    go, x = _plain_operands("patches", go, x, w, stride, padding, dilation, transposed,
                            output_padding, groups)  # fmt: skip
    nd = x.dim() - 2
    for d in range(nd):  # (B, Cin, *positions, *kernel): windows along each spatial dim
        span = dilation[d] * (w.shape[2 + d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    batch, positions = x.shape[0], go[0, 0].numel()
    # (B, Cin x kernel, positions): positions innermost, so the copy reads rows of the input
    # (to (B, positions, Cin x kernel) it gathers 27-float rows: 10 ms against 0.6 ms for a
    # 1-channel 48^3 pair), and the matmul takes the transpose as a view.
    order = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    patches = x.permute(order).reshape(batch, -1, positions)
    go = go.reshape(batch, go.shape[1], positions)
    return torch.bmm(go, patches.transpose(1, 2)).view(batch, *w.shape)


def _plain_operands(strategy, go, x, w, stride, padding, dilation, transposed, output_padding,
                    groups):  # fmt: skip
    """(go, x padded) of the ungrouped plain conv whose per-sample weight gradient this
    layer's is, for the strategies that compute it themselves (patches, direct). A
    transposed conv is the adjoint of the conv with its weight: <go, conv_T(x, w)> =
    <conv(go, w), x>, so its weight gradient is that conv's with go as the input and x as
    the output gradient (when conv(go) gives back x's size: ``_patches_fit``)."""
    if groups != 1:
        raise ValueError(f"the {strategy} strategy is for ungrouped convolutions (groups=1)")
    if transposed:
        if not _forward_input_grad_fits(go, x, w, stride, padding, dilation, True,
                                        output_padding, groups):  # fmt: skip
            raise ValueError("this transposed conv's output padding reaches its stride")
        go, x = x, go
    if not any(padding):
        return go, x  # (a pad of zeros would still copy x)
    return go, torch.nn.functional.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])


# The patches hold at most this many floats per output position (Cin x kernel volume): a
# 1-channel 3x3x3 conv's 27, never a hidden layer's (16 channels x 27 = 432). A 1x1x1
# kernel's patches are the input itself (a view, or a strided subsample): any width fits.
_PATCH_FLOATS = 64


def _patches_fit(go, x, w, stride, padding, dilation, transposed, output_padding, groups):
    """At most _PATCH_FLOATS floats a position (w[0] is Cin x kernel of a conv, Cout x
    kernel of a transposed one) or a 1x1x1 kernel, ungrouped, and a transposed conv's
    adjoint fits x."""
    if groups != 1 or (w[0].numel() > _PATCH_FLOATS and w[0, 0].numel() > 1):
        return False
    return not transposed or _forward_input_grad_fits(
        go, x, w, stride, padding, dilation, transposed, output_padding, groups
    )


def _direct(go, x, w, stride, padding, dilation, transposed, output_padding, groups):
    """Per-sample weight gradient by dpseg's C++ kernel (csrc/cpu/conv_weight_grad_cpu.cpp):
    products of each output row with the shifted input rows, per (sample, output channel),
    with nothing materialised. For the layers ``patches`` serves (``_patches_fit``); a
    transposed conv through its adjoint, as there. Measured at 48^3, B=2, 2 threads
    (AVX-512), against the batched non-private weight gradient: 2->2 3x3x3 1.1 ms (batched
    3.2, grouped 3.9-6.3, patches 4.6); 1->16 5.1 ms (batched 2.2, patches 5.6)."""
    go, x = _plain_operands("direct", go, x, w, stride, padding, dilation, transposed,
                            output_padding, groups)  # fmt: skip
    nd = x.dim() - 2
    lift = [1] * (3 - nd)  # 1-D and 2-D convs as 3-D ones with leading sizes of 1
    out = torch.ops.dpseg.conv_weight_grad_per_sample(
        go.reshape(go.shape[0], go.shape[1], *lift, *go.shape[2:]),
        x.reshape(x.shape[0], x.shape[1], *lift, *x.shape[2:]),
        lift + list(w.shape[2:]), lift + list(stride), lift + list(dilation),
    )  # fmt: skip
    return out.view(x.shape[0], *w.shape)


def _ext_has(op: str) -> bool:
    from dpseg.ops import _ext

    return _ext.has_op(op)


def _direct_runs(x) -> bool:
    """The kernel is built and takes these tensors (CPU, float32 or float64)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and _ext_has("conv_weight_grad_per_sample")
    )


def _direct_usable(go, x, w, geometry) -> bool:
    """Worth timing: the kernel runs, the layer is one ``patches`` would take, and each
    output plane is one run (unit stride in the last two dims, no dilation in the last;
    the row-by-row path is exact but slower than ``patches``)."""
    stride, dilation = geometry[0], geometry[2]
    return (
        _direct_runs(x)
        and _patches_fit(go, x, w, *geometry)
        and w[0].numel() <= _PATCH_FLOATS  # not a wide 1x1x1 conv: a matmul's work
        and all(s == 1 for s in stride[-2:])
        and dilation[-1] == 1
    )


def _triton(go, x, w, *geometry):
    from dpseg.ops import triton_backend

    return triton_backend.kernel("conv_weight_grad").per_sample_conv_weight_grad(
        go, x, w, *geometry
    )


def _triton_usable(device: torch.device) -> bool:
    from dpseg.ops import triton_backend

    return triton_backend.triton_importable() and triton_backend.triton_runs_on(device)


_IMPLS = {
    "loop": _loop, "grouped": _grouped, "patches": _patches, "direct": _direct, "triton": _triton,
}  # fmt: skip
_forced: list[str] = []  # innermost force_strategy() last


@contextlib.contextmanager
def force_strategy(name: str) -> Iterator[None]:
    """Within the block every per-sample conv weight gradient uses ``name`` (e.g. "triton"
    for an engine run with backend="triton")."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown conv strategy {name!r}; use one of {STRATEGIES}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


_TIMING_ROUNDS = 3


def _fastest(candidates: dict, device: torch.device) -> str:
    """The name of the fastest of ``candidates`` (name -> zero-argument callable): each
    called once to build its oneDNN primitive, then timed over interleaved rounds, the
    minimum of each kept; rounds interleaved share the machine's drift. With one timed
    call each, MONAI's UNet (48^3, B=2, 2 threads) took ``fused`` on layers where grouped
    plus a separate input gradient was faster (per-layer microbenchmark); with this, its DP
    step went from 1.144x to 1.107x of non-private in back-to-back benches.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for fn in candidates.values():
        fn()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(_TIMING_ROUNDS):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def _candidate(name, go, x, w, geometry, need_input_grad):
    """The work ``name`` does for one layer: its weight gradient, and the separate input
    gradient when one is wanted (what ``fused`` does in one call)."""
    impl = _IMPLS[name]
    if not need_input_grad:
        return lambda: impl(go, x, w, *geometry)
    return lambda: (impl(go, x, w, *geometry), conv_input_grad(go, x, w, *geometry))


def choose_strategy(
    go: torch.Tensor, x: torch.Tensor, w: torch.Tensor, *geometry, need_input_grad: bool = False
) -> str:
    forced = _forced[-1] if _forced else os.environ.get("DPSEG_CONV_STRATEGY")
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"DPSEG_CONV_STRATEGY={forced!r}; use one of {STRATEGIES}")
        if forced in ("patches", "direct") and not _patches_fit(go, x, w, *geometry):
            # no patches of a grouped conv, nor of a hidden layer's (Cin x kernel floats per
            # position, gigabytes at 128^3); the direct kernel would be slow there: the loop
            # is as exact
            return "loop"
        if forced == "direct" and not _direct_runs(x):
            return "loop"  # the kernel is CPU only, float32/64, and may not be built
        return "grouped" if forced == "fused" and not need_input_grad else forced
    if x.shape[0] <= 1 and x.device.type != "cuda":
        return "loop"
    # Poisson batches change size every step: key on the batch's power-of-two bucket, not
    # its size, or every new size would be timed again (a dozen extra calls a layer).
    key = (
        x.shape[0].bit_length(), tuple(x.shape[1:]), tuple(go.shape[1:]), tuple(w.shape),
        x.dtype, x.device.type, need_input_grad, *map(str, geometry),
    )  # fmt: skip
    choice = _choice_cache.get(key)
    if choice is None:
        if go.numel() < _TIMING_THRESHOLD:
            choice = "fused" if need_input_grad else "grouped"
        else:
            names = ["loop", "grouped"]
            if _patches_fit(go, x, w, *geometry):
                names.append("patches")
            if _direct_usable(go, x, w, geometry):
                names.append("direct")
            if x.device.type == "cuda" and _triton_usable(x.device):
                names.append("triton")
            candidates = {
                name: _candidate(name, go, x, w, geometry, need_input_grad) for name in names
            }
            if need_input_grad:  # the separate input gradient, against one fused call
                candidates["fused"] = lambda: _grouped_both(go, x, w, *geometry, True)
            choice = _fastest(candidates, x.device)
        _choice_cache[key] = choice
    return choice


def conv_backward_per_sample(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    geometry: Sequence,
    need_input_grad: bool,
    strategy: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(input gradient or None, per-sample weight gradient (B, *weight.shape)) of a conv;
    geometry as in ``aten.convolution`` after the weight."""
    if x.shape[0] == 0:
        gi = torch.zeros_like(x) if need_input_grad else None
        return gi, weight.new_zeros((0, *weight.shape))
    x, grad_out = dense(x), dense(grad_out)
    geometry = [list(g) if isinstance(g, list | tuple) else g for g in geometry]
    if strategy == "auto":
        strategy = choose_strategy(grad_out, x, weight, *geometry, need_input_grad=need_input_grad)
    if strategy == "fused" and need_input_grad:
        with profiled("dpseg::per_sample_weight_grad[fused]"):
            return _grouped_both(grad_out, x, weight, *geometry, True)
    grad_input = conv_input_grad(grad_out, x, weight, *geometry) if need_input_grad else None
    if strategy == "fused":
        strategy = "grouped"
    return grad_input, per_sample_conv_weight_grad(grad_out, x, weight, *geometry, strategy)


def per_sample_conv_weight_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    strategy: str = "auto",
) -> torch.Tensor:
    """Per-sample gradient of a conv's weight: shape (B, *weight.shape).

    ``x`` is the conv's (already padded, if padding_mode is not zeros) input and
    ``grad_out`` the gradient of its output; geometry as in ``aten.convolution``.
    """
    if x.shape[0] == 0:
        return weight.new_zeros((0, *weight.shape))
    x, grad_out = dense(x), dense(grad_out)
    geometry = (
        list(stride),
        list(padding),
        list(dilation),
        transposed,
        list(output_padding),
        groups,
    )
    if strategy == "auto":
        strategy = choose_strategy(grad_out, x, weight, *geometry)
    elif strategy not in _IMPLS:
        raise ValueError(f"unknown conv strategy {strategy!r}; use 'auto' or one of {STRATEGIES}")
    with profiled(f"dpseg::per_sample_weight_grad[{strategy}]"):
        return _IMPLS[strategy](grad_out, x, weight, *geometry)
