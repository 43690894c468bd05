"""ModuleValidator: Opacus's class, over dpseg's checks (dpseg.privacy.validate).

``validate`` lists what make_private would refuse; ``fix`` mends what can be mended
(BatchNorm to GroupNorm, InstanceNorm's running statistics off) on a copy.
"""

from __future__ import annotations

from torch import nn

from dpseg.privacy.validate import PrivacyModelError, find_problems
from dpseg.privacy.validate import fix as _fix


class UnsupportedModuleError(PrivacyModelError):
    """One reason a module cannot be trained with DP-SGD as it is."""


class ModuleValidator:
    @staticmethod
    def validate(module: nn.Module, *, strict: bool = False) -> list[UnsupportedModuleError]:
        """The problems found; with ``strict=True`` raises them instead (as one error)."""
        errors = [UnsupportedModuleError(p) for p in find_problems(module)]
        if strict and errors:
            raise PrivacyModelError(
                "model is not DP-compatible:\n- " + "\n- ".join(str(e) for e in errors)
            )
        return errors

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        return not cls.validate(module, strict=False)

    @staticmethod
    def fix(module: nn.Module, **kwargs) -> nn.Module:
        """A fixed copy (``inplace=True`` mends the module itself)."""
        return _fix(module, **kwargs)

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs) -> nn.Module:
        """fix, then validate strictly: raises what fixing cannot mend."""
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed
