"""The DP-SGD engine, model-agnostic: capture, per-layer rules, optimizer, accountant."""

from dpseg.privacy.data_loader import DPDataLoader, PoissonBatchSampler
from dpseg.privacy.engine import PrivacyEngine, PrivateModule
from dpseg.privacy.optimizer import DPOptimizer
from dpseg.privacy.validate import PrivacyModelError, fix, validate

__all__ = [
    "DPDataLoader",
    "DPOptimizer",
    "PoissonBatchSampler",
    "PrivacyEngine",
    "PrivacyModelError",
    "PrivateModule",
    "fix",
    "validate",
]
