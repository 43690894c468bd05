"""nnU-Net's loss, checked to be a mean of per-case terms before it trains anything.

nnU-Net's loss is Dice + cross-entropy on every deep-supervision output, weighted (1, 1/2,
1/4, ..., 0 for the lowest resolution, normalised). Its Dice can be a batch Dice (plans'
``batch_dice``: one Dice over the whole batch), which makes each case's gradient depend on
the other cases: the trainer turns it off, and this module refuses it by name wherever it
is still on. Everything else is held to dpseg.check_loss, pointwise on a real batch, which
also refuses what is coupled without a name (an ignore label under cross-entropy's "mean",
whose divisor counts the whole batch's labelled voxels).

dpseg.check_loss takes one output tensor; deep supervision gives several. They are packed
row by row into one tensor and unpacked inside the loss, which leaves the gradient with
respect to every output unchanged, so the check sees exactly the trainer's loss.
"""

from __future__ import annotations

import torch
from torch import nn

from dpseg.privacy import CoupledLossError, check_loss
from dpseg.privacy.units import RowUnits


def refuse_batch_dice(loss: nn.Module) -> None:
    for m in loss.modules():
        if getattr(m, "batch_dice", False):
            raise CoupledLossError(
                f"{type(m).__name__}(batch_dice=True) computes one Dice over the whole batch "
                "(nnU-Net's batch Dice), so each case's gradient depends on the other cases "
                "and per-case clipping bounds nothing. nnUNetTrainerDP builds the loss with "
                "batch_dice=False; a subclass that builds its own must do the same."
            )


def _as_list(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, list | tuple) else [x]


def check_case_loss(loss: nn.Module, output, target, units: RowUnits) -> None:
    """Raises CoupledLossError unless ``loss(output, target)`` is the mean over the batch's
    rows of per-case terms (coupling inside one case's k patches is allowed)."""
    refuse_batch_dice(loss)
    outputs = _as_list(output)
    multi = isinstance(output, list | tuple)
    rows = outputs[0].shape[0]
    shapes = [o.shape[1:] for o in outputs]
    sizes = [o[0].numel() if rows else 0 for o in outputs]
    packed = torch.cat([o.detach().reshape(rows, -1) for o in outputs], dim=1)

    def unpacked(p: torch.Tensor, t):
        parts = [c.reshape(p.shape[0], *s) for c, s in zip(p.split(sizes, 1), shapes, strict=True)]
        return loss(parts if multi else parts[0], t)

    check_loss(unpacked, packed, target, units, loss_reduction="mean")


__all__ = ["check_case_loss", "refuse_batch_dice"]
