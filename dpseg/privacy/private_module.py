"""PrivateModule: the user's model with per-sample capture installed.

It is also where plain gradient accumulation is stopped. Two ``loss.backward()`` calls on two
batches before one ``optimizer.step()`` would add the per-sample gradients of the two
batches sample by sample (sample i of each, clipped as one patient), so a forward pass that
starts while per-sample gradients of an earlier backward are still waiting for the step is
refused. What stays exact, because the samples are the same: a layer used twice in one
forward (weight sharing), and several backward passes from one forward. Virtual batches
larger than memory go through :class:`dpseg.BatchMemoryManager`, whose skipped steps move
each physical batch's clipped gradients out of ``grad_sample`` before the next forward.
"""

from __future__ import annotations

import torch
from torch import nn

from dpseg.privacy.capture import ForwardPasses, capture_layers, release_layers
from dpseg.privacy.units import UnitFeed


class PendingGradientsError(RuntimeError):
    """A new forward pass while per-sample gradients of an earlier one wait for step()."""


class EscapedGradientError(RuntimeError):
    """A parameter got an ordinary gradient: part of it never went through the capture."""


def _batch_of(args, kwargs) -> int | None:
    """The batch size of a forward call: the leading size of its first tensor input."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class PrivateModule(nn.Module):
    """``_module`` is the original, as in Opacus's GradSampleModule, so state_dict keys carry
    the ``_module.`` prefix."""

    def __init__(
        self, module: nn.Module, allow_fallback: bool = True, conv_strategy: str | None = None
    ):
        super().__init__()
        self._module = module
        self._passes = ForwardPasses(strict=True)
        self._layers = capture_layers(
            module, allow_fallback=allow_fallback, conv_strategy=conv_strategy, passes=self._passes
        )
        # Which rows of a batch are one unit: the DP loader's feed (make_private shares it).
        self.unit_feed = UnitFeed()
        self._escape_hooks = _watch_for_escaped_gradients(module)

    def forward(self, *args, **kwargs):
        rows, units = _batch_of(args, kwargs), None
        if torch.is_grad_enabled():  # without grad no per-sample gradient can be made
            self._refuse_pending_gradients()
            units = self.unit_feed.for_forward(rows)
        with self._passes.running(batch=rows, units=units):
            return self._module(*args, **kwargs)

    def _refuse_pending_gradients(self) -> None:
        for layer in self._layers:
            for name, p in layer.module.named_parameters(recurse=layer.unit):
                if getattr(p, "grad_sample", None) is not None:
                    where = f"{layer.name}.{name}" if layer.name else name
                    raise PendingGradientsError(
                        "a new forward pass started while per-sample gradients of an earlier "
                        f"backward are waiting for optimizer.step() ({where}). DP-SGD clips "
                        "each sample of one batch; accumulating a second batch would add "
                        "sample i of both batches and clip them as one patient. To train a "
                        "logical batch larger than memory, wrap the loader in "
                        "dpseg.BatchMemoryManager(data_loader=..., max_physical_batch_size=..., "
                        "optimizer=...); otherwise call optimizer.step() or "
                        "optimizer.zero_grad() before the next forward."
                    )

    def release(self) -> nn.Module:
        """Removes the capture and returns the plain model (for export or evaluation)."""
        release_layers(self._layers)
        self._layers = []
        for handle in self._escape_hooks:
            handle.remove()
        self._escape_hooks = []
        return self._module


def _watch_for_escaped_gradients(module: nn.Module) -> list:
    """Every trainable parameter sits in a captured layer, whose backward hands autograd no
    parameter gradient; so autograd accumulating one into ``p.grad`` means the parameter was
    also used outside its layer (``F.linear(x, self.head.weight)`` beside ``self.head(x)``,
    a weight tied into another module). That part of its gradient is not per sample and
    cannot be clipped: refuse it where it arrives. Watching the gradient on its way in
    rather than ``p.grad is not None`` stays right in a loop that skips ``zero_grad()``.
    (The captured layers' "no gradient" also reaches these hooks, as None.)"""
    handles = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            handles.append(p.register_hook(_escaped(name, tuple(p.shape))))
    return handles


def _escaped(name: str, shape: tuple):
    def hook(grad: torch.Tensor | None) -> None:
        if grad is None:
            return
        raise EscapedGradientError(
            f"parameter {name!r} {shape} received a gradient outside the layer "
            "dpseg captures it in: the model also uses it elsewhere (a functional call such "
            "as F.linear(x, layer.weight), a weight tied into a second module, a parameter "
            "read by its parent). That part of its gradient is not per sample and cannot be "
            "clipped, so the step is refused. Use the parameter only through its own module, "
            "or register the module that uses it both ways as one unit with "
            "dpseg.privacy.register_functional_block(ItsClass)."
        )

    return hook
