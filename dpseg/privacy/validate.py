"""Which models DP-SGD can train, and ``fix`` for the common offenders.

- BatchNorm normalises over the batch: each sample's gradient depends on the others, so
  per-sample clipping no longer bounds one patient's influence. ``fix`` swaps it for
  GroupNorm.
- InstanceNorm with ``track_running_stats=True`` keeps running means and variances of the
  training data in its buffers, released with the model and never noised. ``fix`` turns
  the tracking off (each sample is normalised by its own statistics, in training as now).
- nn.MultiheadAttention with batch_first=False: its input's leading dimension is the
  sequence, not the batch. Build it with batch_first=True.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


class PrivacyModelError(ValueError):
    """The model cannot be trained with per-sample clipping as it is."""


def find_problems(model: nn.Module) -> list[str]:
    problems = []
    for name, module in model.named_modules():
        where = f"{name or 'model'} ({type(module).__name__})"
        if isinstance(module, _BatchNorm):  # SyncBatchNorm included
            problems.append(
                f"{where} normalises over the batch, so each sample's gradient depends on the "
                "others and per-sample clipping no longer bounds one patient's influence. Use "
                "dpseg.privacy.fix(model) to swap it for GroupNorm, or use "
                "GroupNorm/InstanceNorm."
            )
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            problems.append(
                f"{where} tracks running statistics of the training data, which would be "
                "released with the model without noise. Use dpseg.privacy.fix(model), or "
                "build it with track_running_stats=False."
            )
        elif isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            problems.append(
                f"{where} takes (sequence, batch, features): dpseg reads samples off the "
                "leading dimension. Build it with batch_first=True."
            )
    return problems


def validate(model: nn.Module) -> None:
    problems = find_problems(model)
    if problems:
        raise PrivacyModelError("model is not DP-compatible:\n- " + "\n- ".join(problems))


def _groups_for(channels: int, preferred: int = 32) -> int:
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def _fixed(module: nn.Module) -> nn.Module | None:
    """The replacement for a module ``find_problems`` flags and ``fix`` can mend, else None."""
    if isinstance(module, _BatchNorm):
        c = module.num_features
        return nn.GroupNorm(_groups_for(c), c, affine=module.affine)
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        module.track_running_stats = False
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            module.register_buffer(buffer, None)
        return module
    return None


def fix(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replaces every BatchNorm with GroupNorm (largest group count <= 32 dividing C), and
    stops InstanceNorm from tracking running statistics."""
    model = model if inplace else copy.deepcopy(model)

    def replace(parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            new = _fixed(child)
            if new is not None:
                setattr(parent, child_name, new)
            else:
                replace(child)

    new = _fixed(model)
    if new is not None:
        return new
    replace(model)
    return model
