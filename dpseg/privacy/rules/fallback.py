"""Per-sample gradients for trainable layers that have no rule, through torch.func.

Correct for any layer whose output for sample b depends only on input b, but it recomputes
the layer in the backward (vmap over the batch), so it is slower than a rule; the capture
warns once per layer type when it uses it.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from dpseg.privacy.rules import Rule


class FuncFallbackRule(Rule):
    def __init__(self, layer):
        self.layer = layer  # the capture's record for this module, to bypass it on recompute

    def forward(self, module, x, state):
        return type(module).forward(module, x), (x,)

    def backward(self, module, saved, state, grad_out, need_input_grad, names):
        (x,) = saved
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in names}

        def contribution(p, xb, gb):
            return (functional_call(module, p, (xb.unsqueeze(0),)) * gb.unsqueeze(0)).sum()

        self.layer.bypass = True  # functional_call calls the module; do not capture again
        try:
            with torch.enable_grad():
                per_sample = vmap(grad(contribution), in_dims=(None, 0, 0))(params, x, grad_out)
                grad_input = None
                if need_input_grad:
                    x_ = x.detach().requires_grad_(True)
                    out = functional_call(module, params, (x_,))
                    (grad_input,) = torch.autograd.grad(out, x_, grad_out)
        finally:
            self.layer.bypass = False
        return grad_input, [per_sample[n] for n in names]
