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

import inspect
import warnings

import torch
from torch import nn

from dpseg.privacy.loss_check import CoupledLossError, check_loss, known_coupled
from dpseg.privacy.units import UnitFeed, UnitMapError


class _SameCall(nn.Module):
    """The user's call of their loss with (output, target) replaced: what the check runs
    per unit, the call's other arguments carried in the target (cut by rows where they are
    led by the batch). A module, so that the check's float64 copy reaches the loss's
    buffers (class weights)."""

    def __init__(self, criterion: nn.Module, signature: inspect.Signature, names: list[str]):
        super().__init__()
        self.criterion, self.signature, self.names = criterion, signature, names

    def forward(self, output, packed):
        target, rest = packed
        arguments = {self.names[0]: output, self.names[1]: target, **rest}
        call = inspect.BoundArguments(self.signature, arguments)
        return self.criterion(*call.args, **call.kwargs)


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
        self._warned = False

    def watch(self) -> bool:
        """Checks the user's own criterion object where the user calls it (the training loop
        of plain mode, which never sees this wrapper): a forward hook on it runs the check on
        its first training call over two units or more, then goes away (as does a hook an
        earlier make_private left). False for a criterion that is not an nn.Module (a
        function): its calls cannot be seen."""
        criterion = self.criterion
        if not isinstance(criterion, nn.Module):
            return False
        earlier = getattr(criterion, "_dpseg_watch", None)
        if earlier is not None:
            earlier.remove()
        signature = inspect.signature(criterion.forward)

        def on_call(_module, args, kwargs, loss):
            if not torch.is_grad_enabled():
                return  # validation: not a training batch
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                bound = None
            names = list(bound.arguments) if bound is not None else []
            plain = [
                n for n in names[:2]
                if signature.parameters[n].kind
                in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            ]  # fmt: skip
            if len(plain) < 2:
                self._cannot_read(type(criterion).__name__)
                return
            output, target = bound.arguments[plain[0]], bound.arguments[plain[1]]
            rest = {n: bound.arguments[n] for n in names[2:]}
            call = _SameCall(criterion, signature, plain)
            try:
                self._check_first(output, (target, rest), loss, call)
            except UnitMapError:
                return  # rows the loader did not yield (a hand-made batch): the next call

        handle = criterion.register_forward_hook(on_call, with_kwargs=True)
        criterion._dpseg_watch = handle
        self._watch = handle
        return True

    def _cannot_read(self, name: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"dpseg could not read (output, target) from this call of {name}: it checks "
                "a loss called as loss(output, target, ...). This call was not checked for "
                "coupling across samples; check it with dpseg.check_loss(loss_fn, output, "
                "target).",
                UserWarning,
                stacklevel=3,
            )

    def _check_first(self, output, target, loss, loss_fn=None) -> None:
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
            check_loss(loss_fn or self.criterion, output, target, units, self.loss_reduction)
        finally:
            self._checking = False
        self.checked = True
        if self._watch is not None:
            if getattr(self.criterion, "_dpseg_watch", None) is self._watch:
                del self.criterion._dpseg_watch
            self._watch.remove()
            self._watch = None

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(output, target)
        self._check_first(output, target, loss)
        return loss
