"""Conv1/2/3d and ConvTranspose1/2/3d: any stride, padding, dilation, groups, output_padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpseg.privacy.rules import Rule, autocast_dtype, check_input_dtype, register_rule
from dpseg.privacy.rules.conv_weight_grad import (
    conv_backward_per_sample,
    conv_input_grad,
    dense,
)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _explicit_padding(module: nn.Module, x: torch.Tensor):
    """(x, padding) with padding a list of ints: pads x itself (autograd-tracked) when the
    padding is not zeros or is asymmetric ('same' with an even receptive field)."""
    pairs = module._reversed_padding_repeated_twice  # [left, right] per dim, last dim first
    nd = len(module.kernel_size)
    left = [pairs[2 * (nd - 1 - i)] for i in range(nd)]
    right = [pairs[2 * (nd - 1 - i) + 1] for i in range(nd)]
    if module.padding_mode != "zeros":
        return F.pad(x, pairs, mode=module.padding_mode), [0] * nd
    if left != right:
        return F.pad(x, pairs), [0] * nd
    return x, left


@register_rule(*_CONV, *_CONV_T)
class ConvRule(Rule):
    strategy = "auto"

    def prepare(self, module, x, output_size=None):
        """Returns (x, geometry): the aten.convolution arguments after the weight."""
        nd = len(module.kernel_size)
        if isinstance(module, _CONV_T):
            output_padding = module._output_padding(
                x,
                output_size,
                list(module.stride),
                list(module.padding),
                list(module.kernel_size),
                nd,
                list(module.dilation),
            )
            padding, transposed = list(module.padding), True
        else:
            if output_size is not None:
                raise TypeError(f"{type(module).__name__}.forward takes no output_size")
            x, padding = _explicit_padding(module, x)
            output_padding, transposed = [0] * nd, False
        geometry = (
            list(module.stride),
            padding,
            list(module.dilation),
            transposed,
            list(output_padding),
            module.groups,
        )
        return x, geometry

    def forward(self, module, x, geometry):
        w, b = module.weight, module.bias
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, w = x.to(dtype), w.to(dtype)
            b = b.to(dtype) if b is not None else None
        else:
            check_input_dtype(module, x, w)
        out = torch.ops.aten.convolution(x, w, b, *geometry)
        return out, (x,)

    def backward(self, module, saved, geometry, grad_out, need_input_grad, names):
        (x,) = saved
        w = module.weight.to(x.dtype)  # no-op unless the forward ran under autocast
        grad_input, weight_grad = None, None
        if "weight" in names:
            grad_input, weight_grad = conv_backward_per_sample(
                grad_out, x, w, geometry, need_input_grad, strategy=self.strategy
            )
        elif need_input_grad:  # a frozen weight: the input gradient alone
            grad_input = conv_input_grad(dense(grad_out), dense(x), w, *geometry)
        grads = []
        for name in names:
            if name == "weight":
                grads.append(weight_grad)
            else:  # bias: the output gradient summed over positions
                grads.append(grad_out.sum(dim=tuple(range(2, grad_out.dim()))))
        return grad_input, grads
