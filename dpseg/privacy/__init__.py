"""The DP-SGD engine, model-agnostic: capture, per-layer rules, optimizer, accountant."""

from dpseg.privacy.accountants import Guarantee
from dpseg.privacy.batch_memory_manager import BatchMemoryManager
from dpseg.privacy.capture import register_functional_block
from dpseg.privacy.criterion import DPCriterion
from dpseg.privacy.data_loader import DPDataLoader, PoissonBatchSampler
from dpseg.privacy.engine import PrivacyEngine
from dpseg.privacy.loss_check import CoupledLossError, ReductionMismatchError, check_loss
from dpseg.privacy.optimizer import DPOptimizer
from dpseg.privacy.private_module import EscapedGradientError, PendingGradientsError, PrivateModule
from dpseg.privacy.units import PatientIndex, RowUnits, UnitMapError
from dpseg.privacy.validate import PrivacyModelError, fix, validate

__all__ = [
    "BatchMemoryManager",
    "CoupledLossError",
    "ReductionMismatchError",
    "DPCriterion",
    "DPDataLoader",
    "DPOptimizer",
    "EscapedGradientError",
    "Guarantee",
    "PatientIndex",
    "PendingGradientsError",
    "PoissonBatchSampler",
    "PrivacyEngine",
    "PrivacyModelError",
    "PrivateModule",
    "RowUnits",
    "UnitMapError",
    "check_loss",
    "fix",
    "register_functional_block",
    "validate",
]
