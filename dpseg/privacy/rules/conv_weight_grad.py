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
so ``auto`` times both once per shape (second call, after oneDNN built its primitive) and
caches the winner for the process. Small problems skip the timing and take ``grouped``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from torch.autograd.profiler import record_function

STRATEGIES = ("loop", "grouped")
_aten_conv_backward = torch.ops.aten.convolution_backward
_choice_cache: dict[tuple, str] = {}
# Below this many grad_out elements the call costs microseconds; timing it costs more.
_TIMING_THRESHOLD = 1 << 17


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
    batch = x.shape[0]
    x_g = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    go_g = go.reshape(1, batch * go.shape[1], *go.shape[2:])
    # Only the weight's shape matters to a weight-gradient call; B*P floats are cheap.
    w_g = w.repeat(batch, *([1] * (w.dim() - 1)))
    g = _weight_grad(
        go_g, x_g, w_g, stride, padding, dilation, transposed, output_padding, batch * groups
    )
    return g.view(batch, *w.shape)


_IMPLS = {"loop": _loop, "grouped": _grouped}


def _timed(fn, *args) -> float:
    fn(*args)
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def choose_strategy(go: torch.Tensor, x: torch.Tensor, w: torch.Tensor, *geometry) -> str:
    forced = os.environ.get("DPSEG_CONV_STRATEGY")
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"DPSEG_CONV_STRATEGY={forced!r}; use one of {STRATEGIES}")
        return forced
    if x.shape[0] <= 1:
        return "loop"
    key = (
        tuple(x.shape),
        tuple(go.shape),
        tuple(w.shape),
        x.dtype,
        x.device.type,
        *map(str, geometry),
    )
    choice = _choice_cache.get(key)
    if choice is None:
        if go.numel() < _TIMING_THRESHOLD:
            choice = "grouped"
        else:
            times = {name: _timed(impl, go, x, w, *geometry) for name, impl in _IMPLS.items()}
            choice = min(times, key=times.get)
        _choice_cache[key] = choice
    return choice


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
    x, grad_out = x.contiguous(), grad_out.contiguous()
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
    with record_function(f"dpseg::per_sample_weight_grad[{strategy}]"):
        return _IMPLS[strategy](grad_out, x, weight, *geometry)
