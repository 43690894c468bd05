"""Linear: per-sample gradients in closed form over any number of middle dimensions."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from dpseg.privacy.rules import Rule, autocast_dtype, check_input_dtype, register_rule


@register_rule(nn.Linear)
class LinearRule(Rule):
    def forward(self, module, x, state):
        w, b = module.weight, module.bias
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, w = x.to(dtype), w.to(dtype)
            b = b.to(dtype) if b is not None else None
        else:
            check_input_dtype(module, x, w)
        return F.linear(x, w, b), (x,)

    def backward(self, module, saved, state, grad_out, need_input_grad, names):
        (x,) = saved
        grad_input = grad_out @ module.weight.to(x.dtype) if need_input_grad else None
        batch, positions = x.shape[0], math.prod(x.shape[1:-1])
        go = grad_out.reshape(batch, positions, grad_out.shape[-1])
        grads = []
        for name in names:
            if name == "weight":
                grads.append(go.transpose(1, 2) @ x.reshape(batch, positions, x.shape[-1]))
            else:
                grads.append(go.sum(1))
        return grad_input, grads
