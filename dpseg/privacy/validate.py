"""Which models DP-SGD can train, and ``fix`` for the common offender (BatchNorm)."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class PrivacyModelError(ValueError):
    """The model cannot be trained with per-sample clipping as it is."""


def find_problems(model: nn.Module) -> list[str]:
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):  # SyncBatchNorm included
            problems.append(
                f"{name or 'model'} ({type(module).__name__}) normalises over the batch, so "
                "each sample's gradient depends on the others and per-sample clipping no "
                "longer bounds one patient's influence. Use dpseg.privacy.fix(model) to swap "
                "it for GroupNorm, or use GroupNorm/InstanceNorm."
            )
    return problems


def validate(model: nn.Module) -> None:
    problems = find_problems(model)
    if problems:
        raise PrivacyModelError("model is not DP-compatible:\n- " + "\n- ".join(problems))


def _groups_for(channels: int, preferred: int = 32) -> int:
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def fix(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replaces every BatchNorm with GroupNorm (largest group count <= 32 dividing C)."""
    model = model if inplace else copy.deepcopy(model)

    def replace(parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            if isinstance(child, _BatchNorm):
                c = child.num_features
                setattr(parent, child_name, nn.GroupNorm(_groups_for(c), c, affine=child.affine))
            else:
                replace(child)

    if isinstance(model, _BatchNorm):
        c = model.num_features
        return nn.GroupNorm(_groups_for(c), c, affine=model.affine)
    replace(model)
    return model
