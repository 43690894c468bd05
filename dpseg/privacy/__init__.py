"""The DP-SGD engine, model-agnostic: capture, per-layer rules, optimizer, accountant."""

from dpseg.privacy.batch_memory_manager import BatchMemoryManager
from dpseg.privacy.capture import register_functional_block
from dpseg.privacy.criterion import DPCriterion
from dpseg.privacy.data_loader import DPDataLoader, PoissonBatchSampler
from dpseg.privacy.engine import PrivacyEngine
from dpseg.privacy.optimizer import DPOptimizer
from dpseg.privacy.private_module import PendingGradientsError, PrivateModule
from dpseg.privacy.validate import PrivacyModelError, fix, validate

__all__ = [
    "BatchMemoryManager",
    "DPCriterion",
    "DPDataLoader",
    "DPOptimizer",
    "PendingGradientsError",
    "PoissonBatchSampler",
    "PrivacyEngine",
    "PrivacyModelError",
    "PrivateModule",
    "fix",
    "register_functional_block",
    "validate",
]
