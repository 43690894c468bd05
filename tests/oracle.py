"""The float64 microbatch oracle: per-sample gradients as a loop over batches of one.

Independent of dpseg's capture: plain autograd on a deep copy of the model, one sample at a
time. It settles every question about per-sample gradients, clipping and the update.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def per_sample_grads(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor | None):
    """{name: (B, *shape)} gradients of loss_fn(model(x_b), y_b), each sample alone."""
    model = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out = {n: [] for n in names}
    for b in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        pred = model(x[b : b + 1])
        loss_fn(pred, None if y is None else y[b : b + 1]).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    params = dict(model.named_parameters())
    return {
        n: torch.stack(g) if g else params[n].new_zeros((0, *params[n].shape))
        for n, g in out.items()
    }


def dp_sum(per_sample: dict, max_grad_norm: float) -> tuple[torch.Tensor, dict]:
    """Per-sample norms over all parameters, and sum_b min(1, C/(n_b+1e-6)) g_b per parameter."""
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample.values()], dim=1)
    norms = flat.norm(dim=1)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {
        n: (g * factors.view(-1, *([1] * (g.dim() - 1)))).sum(0) for n, g in per_sample.items()
    }
    return norms, summed


def per_unit_grads(model: nn.Module, loss_fn, x: torch.Tensor, y, groups):
    """{name: (U, *shape)}: unit u's gradient is that of loss_fn over its own rows
    (``groups[u]``, indices into x and y) alone, a loop over units; with a loss that is a
    mean over rows, the mean of the rows' per-sample gradients."""
    model = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out = {n: [] for n in names}
    for rows in groups:
        rows = torch.as_tensor(rows, dtype=torch.long)
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[rows]), None if y is None else y[rows]).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    params = dict(model.named_parameters())
    return {
        n: torch.stack(g) if g else params[n].new_zeros((0, *params[n].shape))
        for n, g in out.items()
    }
