"""Where per-sample gradients land: ``param.grad_sample`` (units, *param.shape).

Every rule's backward (dpseg.privacy.capture) and every forward override's Function
(dpseg.privacy.rules.transformer) hands its per-row gradients here. They are reduced to
per-unit sums by the call's unit map (dpseg.privacy.units), and the gradients of one
forward pass add up; those of two passes never meet (two batches' sample i are different
patients)."""

from __future__ import annotations

import torch


def accumulate_per_sample(
    param: torch.Tensor, g: torch.Tensor, name: str, pass_info: tuple, reduced: bool = False
) -> None:
    """Adds one call's per-row gradients to ``grad_sample``, reduced to per-unit sums (in
    the parameter's dtype, not autocast's) by the call's unit map; ``reduced``: they are
    per unit already. ``pass_info``: (pass number, the pass's RowUnits, the call's)."""
    pass_id, units, call_units = pass_info
    g = g.to(param.dtype)
    if call_units is not None and not reduced:
        g = call_units.reduce(g)
    existing = getattr(param, "grad_sample", None)
    if existing is None:
        param.grad_sample = g
        param._dpseg_pass = pass_id
        param._dpseg_units = units
    elif getattr(param, "_dpseg_pass", pass_id) != pass_id:
        raise RuntimeError(
            f"{name}: per-sample gradients of two different forward passes met before "
            "optimizer.step(). DP-SGD would add them sample by sample, clipping sample i of "
            "one batch and sample i of the other as one patient. To accumulate a logical "
            "batch larger than memory, use dpseg.BatchMemoryManager(data_loader=..., "
            "max_physical_batch_size=..., optimizer=...); if both passes hold the same "
            "samples, run them through one forward call."
        )
    elif existing.shape[0] != g.shape[0]:
        raise RuntimeError(
            f"{name}: per-sample gradients of batches of {existing.shape[0]} and {g.shape[0]} "
            "met before optimizer.step(); DP-SGD clips each sample of ONE batch. Call "
            "optimizer.step() (or zero_grad()) between batches."
        )
    else:
        existing.add_(g)
