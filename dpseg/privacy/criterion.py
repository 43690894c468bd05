"""The loss that make_private(grad_sample_mode="ghost") hands back, as Opacus does.

Opacus's ghost clipping needs the loss per sample (reduction "none", shape (B,)) for its two
backward passes, so a segmentation loss that is per voxel, (B, D, H, W), fails there. dpseg
needs no second pass: its capture yields per-sample gradients from the one ordinary
backward. The criterion is therefore the user's own loss, called as ``criterion(output,
target)``, reducing per-voxel losses as it always does (CrossEntropyLoss with reduction
"mean": the mean over voxels and batch). In plain mode, where the loop calls the user's own
loss object, a forward hook on it runs the same check (``DPCriterion.watch``). What is
checked is that its reduction is the one
the engine was told (``loss_reduction``), since the clip factor undoes exactly that, and
that it does not couple the units of a batch: on the first batch with two units or more,
:func:`dpseg.privacy.loss_check.check_loss` holds it against its per-unit terms (B + 1 loss
evaluations in float64, no pass of the model), and losses known to pool over the batch
(MONAI's Dice losses with batch=True, top-k/OHEM) are refused when it is built.
"""

from __future__ import annotations

import torch
from torch import nn

from dpseg.privacy.loss_check import CoupledLossError, check_loss, known_coupled
from dpseg.privacy.units import UnitFeed, UnitMapError


class DPCriterion(nn.Module):
    def __init__(self, criterion, loss_reduction: str, unit_feed: UnitFeed | None = None):
        super().__init__()
        if not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
        reason = known_coupled(criterion)
        if reason is not None:
            raise CoupledLossError(reason)
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
        self.unit_feed = unit_feed or UnitFeed()
        self.checked = False  # whether a batch of two units or more has been checked
        self._checking = False  # the check calls the loss (or a copy with its hooks)
        self._watch = None

    def watch(self) -> bool:
        """Checks the user's own criterion object where the user calls it (the training loop
        of plain mode, which never sees this wrapper): a forward hook on it runs the check on
        its first call over two units or more, then goes away. False for a criterion that
        is not an nn.Module (a function): its calls cannot be seen."""
        if not isinstance(self.criterion, nn.Module):
            return False

        def on_call(_module, args, loss):
            if len(args) < 2 or not torch.is_grad_enabled():
                return  # validation (no_grad) or another call: not a training batch
            try:
                self._check_first(args[0], args[1], loss)
            except UnitMapError:
                return  # rows the loader did not yield (a hand-made batch): the next call

        self._watch = self.criterion.register_forward_hook(on_call)
        return True

    def _check_first(self, output, target, loss) -> None:
        if self.checked or self._checking:
            return
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"the criterion returned {shape}, not a scalar loss; reduce it over the batch "
                f"({self.loss_reduction!r}) before backward()"
            )
        if not isinstance(output, torch.Tensor) or output.dim() == 0:
            return
        units = self.unit_feed.for_forward(output.shape[0])
        if units is None or units.num_units < 2:
            return
        self._checking = True
        try:
            check_loss(self.criterion, output, target, units, self.loss_reduction)
        finally:
            self._checking = False
        self.checked = True
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(output, target)
        self._check_first(output, target, loss)
        return loss
