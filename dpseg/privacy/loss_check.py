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

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from dpseg.privacy.units import RowUnits

RTOL = 1e-7  # float64: a per-unit loss agrees to ~1e-15; a coupled one is off by percents
# A loss that computes in a lower precision whatever its input (MONAI's FocalLoss casts to
# float32) agrees to its own rounding only: this many of its epsilons (float32: 1.2e-4; a
# coupled loss is off by percents).
LOW_PRECISION_EPS = 1000
_FLOAT32_EPS = torch.finfo(torch.float32).eps


class CoupledLossError(ValueError):
    """The loss makes one unit's gradient depend on another unit's data."""


class ReductionMismatchError(CoupledLossError):
    """The loss is per unit, but reduced by sum where "mean" was declared, or the reverse:
    the clip factor would undo the wrong constant."""


# The ignore_index PyTorch's losses take by default: no label of a real target equals it.
_NO_IGNORE = -100


def _mean_over_labels(m: nn.Module) -> str | None:
    """Why a PyTorch CrossEntropyLoss / NLLLoss couples a batch by its attributes: under a
    'mean' reduction it divides by the total class weight of the batch's labels, which
    class weights or ignored labels make depend on every sample's target."""
    if not isinstance(m, nn.CrossEntropyLoss | nn.NLLLoss) or m.reduction != "mean":
        return None
    name = type(m).__name__
    if m.weight is not None:
        what = "class weights"
    elif m.ignore_index != _NO_IGNORE:
        what = f"ignore_index={m.ignore_index}"
    else:
        return None
    return (
        f"{name} with {what} and reduction='mean' divides by the summed weight of the batch's "
        "labels, so it couples the samples of a batch: one patient's gradient depends on the "
        f"others' labels. Use reduction='sum' divided by a constant (the expected voxels a "
        "batch), or make_private(loss_reduction='sum') with reduction='sum'."
    )


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
        reason = _mean_over_labels(m) if isinstance(m, nn.Module) else None
        if reason is not None:
            return reason
    return None


def _index(target, rows: torch.Tensor, batch: int):
    """``target``'s rows ``rows``: every tensor led by the batch (``batch`` rows) is cut,
    anything else (class weights passed per call, numbers) is a constant of the call."""
    if isinstance(target, torch.Tensor):
        return target[rows] if target.dim() and target.shape[0] == batch else target
    if isinstance(target, tuple | list):
        return type(target)(_index(t, rows, batch) for t in target)
    if isinstance(target, dict):
        return {k: _index(v, rows, batch) for k, v in target.items()}
    return target


def _as_float64(target):
    if isinstance(target, torch.Tensor):
        return target.detach().double() if target.is_floating_point() else target.detach()
    if isinstance(target, tuple | list):
        return type(target)(_as_float64(t) for t in target)
    if isinstance(target, dict):
        return {k: _as_float64(v) for k, v in target.items()}
    return target


class _LowestPrecision(TorchFunctionMode):
    """Records the largest machine epsilon of the floating-point tensors on the output's
    gradient path that the ops under it produce: the precision a loss really computes in
    (MONAI's FocalLoss casts its input to float32, and DiceFocalLoss adds that to a float64
    Dice: a float64 result of float32 work). Constants and masks do not count."""

    def __init__(self):
        super().__init__()
        self.eps = torch.finfo(torch.float64).eps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:  # only what the output's gradient flows through
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
                self.eps = max(self.eps, torch.finfo(t.dtype).eps)
        return out


def _grad(loss_fn, output: torch.Tensor, target) -> tuple[torch.Tensor, float]:
    """(d loss / d output, the machine epsilon of the lowest precision the loss used)."""
    out = output.detach().clone().requires_grad_(True)
    with _LowestPrecision() as precision:
        loss = loss_fn(out, target)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("the loss must return a scalar (reduced over the batch)")
    (grad,) = torch.autograd.grad(loss, out, allow_unused=True)
    return (torch.zeros_like(out) if grad is None else grad), precision.eps


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
    batch_grad, eps = _grad(loss_fn, output, target)
    lowest = eps
    offsets = [0]
    for k in units.rows_per_unit:
        offsets.append(offsets[-1] + k)
    pairs = []  # (the unit's own-loss gradient, the batch loss's gradient on its rows)
    for u in range(units.num_units):
        rows = torch.arange(offsets[u], offsets[u + 1])
        alone, alone_eps = _grad(loss_fn, output[rows], _index(target, rows, units.rows))
        lowest = max(lowest, alone_eps)
        pairs.append((alone, batch_grad[rows]))
    # float32's rounding at most: below it the check could not tell rounding from coupling
    rtol = max(RTOL, LOW_PRECISION_EPS * min(lowest, _FLOAT32_EPS))

    def first_mismatch(reduction: str):
        """(unit, c, relative error) of the first unit off by more than rtol, or None."""
        for u, (alone, got) in enumerate(pairs):
            c = units.rows_per_unit[u] / units.rows if reduction == "mean" else 1.0
            expected = c * alone
            scale = max(float(expected.abs().max()), float(got.abs().max()), 1e-300)
            err = float((got - expected).abs().max())
            if err > rtol * scale:
                return u, c, err / scale
        return None

    mismatch = first_mismatch(loss_reduction)
    if mismatch is None:
        return
    other = "sum" if loss_reduction == "mean" else "mean"
    if first_mismatch(other) is None:
        raise ReductionMismatchError(
            f"the loss is per {units.unit}, but it reduces the batch by {other!r} where "
            f"loss_reduction={loss_reduction!r} was declared, so the clip factor would undo "
            f"the wrong constant. Make the two agree: make_private(loss_reduction={other!r}) "
            f"(check_loss(..., loss_reduction={other!r})), or build the loss with "
            f"reduction={loss_reduction!r}."
        )
    u, c, err = mismatch
    if lowest > _FLOAT32_EPS:
        raise CoupledLossError(
            f"the loss computes in a precision below float32 on its gradient's path, whose "
            f"rounding ({err:.2%} on {units.unit} {u}) the check cannot tell from a coupling "
            "of the batch's samples: compute the loss in float32 or float64 (outside "
            "autocast) to have it checked."
        )
    raise CoupledLossError(
        f"the loss couples the {units.unit}s of a batch ({what}): the gradient of "
        f"the batch loss on {units.unit} {u}'s outputs differs from {c:.4g} times "
        f"the gradient of its own loss alone by {err:.2%} of its size, so "
        f"its gradient depends on the other {units.unit}s' data and per-{units.unit} "
        "clipping no longer bounds its influence. Use a loss that is a "
        f"{'mean' if loss_reduction == 'mean' else 'sum'} of per-sample terms: no "
        "batch Dice (batch=False), no class weights or ignore_index under a 'mean' "
        "reduction (weight per voxel and divide by a constant instead), no "
        "selection of voxels across the batch."
    )


def _in_float64(loss_fn):
    """(a float64 copy of a loss module (its class weights and other buffers), so that it
    takes the float64 outputs the check hands it, True), a plain function as it is (True),
    or a module that cannot be copied as it is (False: checked in the outputs' dtype)."""
    if not isinstance(loss_fn, nn.Module):
        return loss_fn, True
    try:
        return copy.deepcopy(loss_fn).double(), True
    except Exception:
        return loss_fn, False


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
    loss_fn, in_float64 = _in_float64(loss_fn)
    output = output.detach().double() if in_float64 else output.detach()
    target = _as_float64(target) if in_float64 else target
    _compare(loss_fn, output, target, units, loss_reduction, "as given")
    perm = _permutation(units)
    if perm is not None:
        starts = [0]
        for k in units.rows_per_unit:
            starts.append(starts[-1] + k)
        rows = torch.cat(
            [torch.arange(starts[v], starts[v] + units.rows_per_unit[v]) for v in perm]
        )
        _compare(
            loss_fn, output, _index(target, rows, units.rows), units, loss_reduction,
            "targets permuted",
        )  # fmt: skip
    return None
