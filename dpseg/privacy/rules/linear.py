"""Linear: per-sample gradients in closed form over any number of middle dimensions."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from dpseg.privacy.rules import Rule, register_rule


@register_rule(nn.Linear)
class LinearRule(Rule):
    def forward(self, module, x, state):
        return F.linear(x, module.weight, module.bias), (x,)

    def backward(self, module, saved, state, grad_out, need_input_grad, names):
        (x,) = saved
        grad_input = grad_out @ module.weight if need_input_grad else None
        batch, positions = x.shape[0], math.prod(x.shape[1:-1])
        go = grad_out.reshape(batch, positions, grad_out.shape[-1])
        grads = []
        for name in names:
            if name == "weight":
                grads.append(go.transpose(1, 2) @ x.reshape(batch, positions, x.shape[-1]))
            else:
                grads.append(go.sum(1))
        return grad_input, grads
