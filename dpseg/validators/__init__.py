"""Opacus's import path: ``from dpseg.validators import ModuleValidator``."""

from dpseg.validators.module_validator import ModuleValidator, UnsupportedModuleError

__all__ = ["ModuleValidator", "UnsupportedModuleError"]
