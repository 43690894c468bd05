"""Per-layer rules: how a trainable layer yields grad_input and per-sample parameter grads.

A rule is looked up by module type (through the MRO, so subclasses inherit their parent's
rule). Each rule has three parts, all called by :mod:`dpseg.privacy.capture`:

``prepare(module, x, **kwargs) -> (x, state)``
    Autograd-tracked work that needs no per-sample treatment (non-zero padding modes, the
    parameter-free part of a normalisation), and ``state``: whatever this call must pass on
    (conv geometry, say). Kept per call, so a module used twice is handled right.
``forward(module, x, state) -> (out, saved)``
    The layer's math, run inside one autograd Function; ``saved`` is only the tensors the
    backward needs (the conv input, as ordinary autograd keeps; never an unfolded copy).
``backward(module, saved, state, grad_out, need_input_grad, names) -> (grad_input, [grad_sample])``
    ``grad_sample`` has shape (B, *param.shape) for each parameter named in ``names``, in
    that order. The summed parameter gradient is never computed: the DP step builds it from
    the clipped per-sample gradients, so computing it too would double the most expensive
    part of a conv backward (this is the cost Opacus's hooks pay).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn


class Rule(abc.ABC):
    #: parameters this rule knows; a trainable parameter of another name goes to the fallback.
    param_names: tuple[str, ...] = ("weight", "bias")

    def accepts(self, module: nn.Module) -> bool:
        """False when this instance's configuration is outside the rule (falls back)."""
        return True

    def prepare(self, module: nn.Module, x: torch.Tensor, **kwargs):
        if kwargs:
            raise TypeError(f"{type(module).__name__}.forward got unexpected {sorted(kwargs)}")
        return x, None

    @abc.abstractmethod
    def forward(self, module: nn.Module, x: torch.Tensor, state):
        """Returns (out, saved)."""

    @abc.abstractmethod
    def backward(
        self,
        module: nn.Module,
        saved: Sequence[torch.Tensor],
        state,
        grad_out: torch.Tensor,
        need_input_grad: bool,
        names: Sequence[str],
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Returns (grad_input or None, per-sample grads for ``names``)."""


_RULES: dict[type, list[Rule]] = {}


def register_rule(*module_types: type):
    """Class decorator: ``@register_rule(nn.Conv3d)`` adds an instance of the rule; of several
    rules for one type, the first whose ``accepts`` says yes serves a module."""

    def wrap(cls):
        for t in module_types:
            _RULES.setdefault(t, []).append(cls())
        return cls

    return wrap


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type (or nearest registered base class), else None."""
    for klass in type(module).__mro__:
        if klass in _RULES:
            return next((r for r in _RULES[klass] if r.accepts(module)), None)
    return None


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The lower-precision dtype when autocast is on for x's device, else None.

    The rules call aten ops (aten.convolution, F.linear inside a Function) that autocast's
    op lists may not cover, so they apply its policy themselves: convs and linears in the
    autocast dtype, norms in their parameters' dtype. Per-sample norms and the clipped sum
    stay fp32/fp64 regardless (the capture casts each grad_sample to the parameter dtype).
    """
    device_type = x.device.type
    if x.dtype not in _AUTOCAST_CASTS:  # float64 and integer tensors: autocast leaves them
        return None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def check_input_dtype(module, x: torch.Tensor, w: torch.Tensor) -> None:
    """The input in the weight's dtype, as ATen's conv and linear need (outside autocast):
    said here, since the rule's own aten call would only say "expected scalar type Long but
    found Float"."""
    if x.dtype != w.dtype:
        raise TypeError(
            f"{type(module).__name__} was given a {x.dtype} input but its weight is {w.dtype}. "
            f"Convert the batch (images.to({w.dtype})) or the model (model.to(images.dtype)) "
            "before the forward; an integer image (a NIfTI stored as int16, say) needs a cast "
            "to float."
        )


def registered_types() -> list[type]:
    return list(_RULES)


# Importing the rule modules registers them.
from dpseg.privacy.rules import activation, conv, linear, norm  # noqa: E402, F401
