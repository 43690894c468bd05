"""Is the loss a sum of per-unit terms? A loss that couples units voids per-unit clipping.

DP-SGD bounds each unit's gradient, which is only a bound on the unit's influence when the
unit's gradient depends on the unit alone. A loss computed over the whole batch breaks
that without a word: MONAI's ``DiceLoss(batch=True)`` (nnU-Net's "batch Dice") computes
one Dice over the batch; ``CrossEntropyLoss(weight=...)`` or ``ignore_index`` with
reduction "mean" divides by a count over the whole batch's labels; top-k and OHEM losses
select voxels across the batch.

The check (pointwise, on one batch, in float64 on detached outputs, B + 1 loss evaluations
and no pass of the model): for every unit u, the gradient of the batch loss with respect to
u's outputs must equal c_u times the gradient of u's loss alone (u's outputs and targets),
with c_u = k_u / R under loss_reduction "mean" (R rows in the batch, k_u of them u's) and
1 under "sum": exactly what the engine undoes when it clips. It runs once as given and once
with the targets permuted across units, so that a coupling through label counts shows even
when one batch happens to hide it. Coupling inside one unit's rows is allowed.

Being pointwise, it cannot prove a loss right on every batch, so losses known to select or
pool across the batch are refused by name (:func:`known_coupled`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dpseg.privacy.units import RowUnits

RTOL = 1e-7  # float64: a per-unit loss agrees to ~1e-15; a coupled one is off by percents


class CoupledLossError(ValueError):
    """The loss makes one unit's gradient depend on another unit's data."""


def known_coupled(loss_fn) -> str | None:
    """Why a loss is refused by what it is, or None."""
    modules = list(loss_fn.modules()) if isinstance(loss_fn, nn.Module) else [loss_fn]
    for m in modules:
        name = type(m).__name__
        lowered = name.lower()
        if "topk" in lowered or "ohem" in lowered:
            return (
                f"{name} keeps the hardest voxels of the whole batch, so which of one "
                "patient's voxels count depends on the other patients. Use a per-sample loss "
                "(dpseg.train.losses.DiceCELoss, MONAI's DiceCELoss with batch=False)."
            )
        if getattr(m, "batch", False) is True and ("dice" in lowered or "tversky" in lowered):
            return (
                f"{name}(batch=True) computes one Dice over the whole batch (nnU-Net's batch "
                "Dice), so each patient's gradient depends on the others and clipping bounds "
                f"nothing. Build it with batch=False: {name}(..., batch=False)."
            )
    return None


def _index(target, rows: torch.Tensor):
    if isinstance(target, torch.Tensor):
        return target[rows]
    if isinstance(target, tuple | list):
        return type(target)(_index(t, rows) for t in target)
    if isinstance(target, dict):
        return {k: _index(v, rows) for k, v in target.items()}
    return target  # a constant of the call


def _as_float64(target):
    if isinstance(target, torch.Tensor):
        return target.detach().double() if target.is_floating_point() else target.detach()
    if isinstance(target, tuple | list):
        return type(target)(_as_float64(t) for t in target)
    if isinstance(target, dict):
        return {k: _as_float64(v) for k, v in target.items()}
    return target


def _grad(loss_fn, output: torch.Tensor, target) -> torch.Tensor:
    out = output.detach().clone().requires_grad_(True)
    loss = loss_fn(out, target)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("the loss must return a scalar (reduced over the batch)")
    (grad,) = torch.autograd.grad(loss, out, allow_unused=True)
    return torch.zeros_like(out) if grad is None else grad


def _permutation(units: RowUnits) -> list[int] | None:
    """A unit order that moves every unit whose row count another unit shares (targets are
    exchanged between units of equal row count), or None when no two units match."""
    by_count: dict[int, list[int]] = {}
    for u, k in enumerate(units.rows_per_unit):
        by_count.setdefault(k, []).append(u)
    perm = list(range(units.num_units))
    moved = False
    for group in by_count.values():
        if len(group) > 1:
            moved = True
            for i, u in enumerate(group):
                perm[u] = group[(i + 1) % len(group)]
    return perm if moved else None


def _compare(loss_fn, output, target, units: RowUnits, loss_reduction: str, what: str):
    batch_grad = _grad(loss_fn, output, target)
    offsets = [0]
    for k in units.rows_per_unit:
        offsets.append(offsets[-1] + k)
    for u in range(units.num_units):
        rows = torch.arange(offsets[u], offsets[u + 1])
        alone = _grad(loss_fn, output[rows], _index(target, rows))
        c = units.rows_per_unit[u] / units.rows if loss_reduction == "mean" else 1.0
        expected, got = c * alone, batch_grad[rows]
        scale = max(float(expected.abs().max()), float(got.abs().max()), 1e-300)
        err = float((got - expected).abs().max())
        if err > RTOL * scale:
            raise CoupledLossError(
                f"the loss couples the {units.unit}s of a batch ({what}): the gradient of "
                f"the batch loss on {units.unit} {u}'s outputs differs from {c:.4g} times "
                f"the gradient of its own loss alone by {err / scale:.2%} of its size, so "
                f"its gradient depends on the other {units.unit}s' data and per-{units.unit} "
                "clipping no longer bounds its influence. Use a loss that is a "
                f"{'mean' if loss_reduction == 'mean' else 'sum'} of per-sample terms: no "
                "batch Dice (batch=False), no class weights or ignore_index under a 'mean' "
                "reduction (weight per voxel and divide by a constant instead), no "
                "selection of voxels across the batch."
            )


def check_loss(
    loss_fn: Callable,
    output: torch.Tensor,
    target,
    units: RowUnits | None = None,
    loss_reduction: str = "mean",
) -> None:
    """Raises :class:`CoupledLossError` when ``loss_fn`` couples the units of this batch
    (``units``: which rows are one unit; default one unit per row), and when it is known
    to couple them whatever the batch. Returns None when the loss passes."""
    reason = known_coupled(loss_fn)
    if reason is not None:
        raise CoupledLossError(reason)
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        raise TypeError("output must be a tensor whose first dimension is the batch")
    units = units if units is not None else RowUnits.identity(output.shape[0])
    if units.rows != output.shape[0]:
        raise ValueError(f"the unit map covers {units.rows} rows, the output has {output.shape[0]}")
    if units.num_units < 2:
        return None  # nothing to couple with
    output = output.detach().double()
    target = _as_float64(target)
    _compare(loss_fn, output, target, units, loss_reduction, "as given")
    perm = _permutation(units)
    if perm is not None:
        starts = [0]
        for k in units.rows_per_unit:
            starts.append(starts[-1] + k)
        rows = torch.cat(
            [torch.arange(starts[v], starts[v] + units.rows_per_unit[v]) for v in perm]
        )
        _compare(loss_fn, output, _index(target, rows), units, loss_reduction, "targets permuted")
    return None
