"""PReLU (MONAI UNet's default activation): per-sample gradients in closed form.

y = x for x > 0, w x otherwise, with w one slope (num_parameters=1) or one per channel
(dimension 1). Then dy/dw = min(x, 0), so dL/dw_b = sum over the positions (and, for a
single slope, the channels) of g * min(x, 0); the input gradient is g where x > 0, w g
elsewhere. Saves only x, as ordinary autograd does.

Both come from ATen's fused _prelu_kernel_backward, which returns the input gradient and the
elementwise g * min(x, 0) in one pass; the per-sample sum is one more reduction. Measured on
MONAI's UNet (16-32-64-128, 2 residual units, 26 PReLUs, 48^3, batch 2, 2 CPU threads):
four where/mul passes cost 9.8 ms a step against ATen's 8.4 ms for the non-private backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpseg.privacy.rules import Rule, register_rule


def _slopes(module: nn.PReLU, x: torch.Tensor) -> torch.Tensor:
    """The slope(s) shaped to broadcast over x: (1, 1 or C, 1, ...)."""
    w = module.weight.to(x.dtype)
    return w.view(1, w.numel(), *([1] * (x.dim() - 2)))


@register_rule(nn.PReLU)
class PReLURule(Rule):
    param_names = ("weight",)

    def forward(self, module, x, state):
        return F.prelu(x, module.weight.to(x.dtype)), (x,)

    def backward(self, module, saved, state, grad_out, need_input_grad, names):
        (x,) = saved
        w = _slopes(module, x)
        grad_input, gx = torch.ops.aten._prelu_kernel_backward(grad_out, x, w)  # gx: g min(x,0)
        if not need_input_grad:
            grad_input = None
        if module.weight.numel() == 1:
            grad = gx.reshape(x.shape[0], -1).sum(1, keepdim=True)
        else:
            grad = gx.sum(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else gx
        return grad_input, [grad]
