"""The loss that make_private(grad_sample_mode="ghost") hands back, as Opacus does.

Opacus's ghost clipping needs the loss per sample (reduction "none", shape (B,)) for its two
backward passes, so a segmentation loss that is per voxel, (B, D, H, W), fails there. dpseg
needs no second pass: its capture yields per-sample gradients from the one ordinary
backward. The criterion is therefore the user's own loss, called as ``criterion(output,
target)``, reducing per-voxel losses as it always does (CrossEntropyLoss with reduction
"mean": the mean over voxels and batch). What is checked is that its reduction is the one
the engine was told (``loss_reduction``), since the clip factor undoes exactly that.
"""

from __future__ import annotations

import torch
from torch import nn


class DPCriterion(nn.Module):
    def __init__(self, criterion, loss_reduction: str):
        super().__init__()
        if not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
        reduction = getattr(criterion, "reduction", None)
        if reduction == "none":
            raise ValueError(
                "the criterion has reduction='none': dpseg needs the loss reduced over the "
                f"batch as loss_reduction={loss_reduction!r} says; give it "
                f"reduction={loss_reduction!r}"
            )
        if isinstance(reduction, str) and reduction != loss_reduction:
            raise ValueError(
                f"the criterion reduces with {reduction!r} but make_private was told "
                f"loss_reduction={loss_reduction!r}; make the two agree (the per-sample "
                "clipping undoes the reduction it was told)"
            )
        self.criterion = criterion
        self.loss_reduction = loss_reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(output, target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"the criterion returned {shape}, not a scalar loss; reduce it over the batch "
                f"({self.loss_reduction!r}) before backward()"
            )
        return loss
