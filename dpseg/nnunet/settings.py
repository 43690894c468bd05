"""The privacy settings of a DP nnU-Net run: public constants, declared before training.

Under add/remove adjacency nothing the run releases may depend on the number of training
cases N (dpseg.privacy.sampling_plan): the Poisson rate q, the number of steps and the
normaliser E (the expected cases a step) are declared, never derived from N. The steps are
nnU-Net's own schedule, epochs x iterations an epoch, each iteration one logical DP step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# What must be the same for a run to continue a ledger (dpseg nnunet train --c).
PRIVACY_KEYS = (
    "sample_rate",
    "expected_cases",
    "patches_per_case",
    "max_grad_norm",
    "target_epsilon",
    "noise_multiplier",
    "delta",
    "accountant",
)


@dataclass
class DPSettings:
    sample_rate: float  # q: each training case is in a step's batch with probability q
    expected_cases: float  # E: the normaliser, the expected cases a step (declared)
    patches_per_case: int = 2  # k: patches drawn from each sampled case, clipped as one
    max_grad_norm: float = 1.0  # C: the bound on one case's gradient
    target_epsilon: float | None = None  # calibrate sigma to spend this over the schedule
    noise_multiplier: float | None = None  # or give sigma itself
    delta: float = 1e-5
    accountant: str = "prv"
    physical_cases: int | None = None  # cases a physical batch (default: plans' batch / k)
    log_train_loss: bool = False  # the raw training loss is not noised: off by default

    def __post_init__(self):
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate q must be in (0, 1], got {self.sample_rate}")
        if not self.expected_cases > 0:
            raise ValueError(f"expected cases E must be > 0, got {self.expected_cases}")
        if isinstance(self.patches_per_case, bool) or not (
            isinstance(self.patches_per_case, int) and self.patches_per_case >= 1
        ):
            raise ValueError(f"patches per case k must be an int >= 1, got {self.patches_per_case}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"the clip C must be > 0, got {self.max_grad_norm}")
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "give exactly one of target_epsilon (sigma is calibrated to spend it over the "
                "whole schedule) and noise_multiplier"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target epsilon must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(
                f"noise multiplier must be > 0 (sigma = 0 is no privacy), got "
                f"{self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.physical_cases is not None and self.physical_cases < 1:
            raise ValueError(f"physical cases must be >= 1, got {self.physical_cases}")

    def privacy(self) -> dict:
        return {k: getattr(self, k) for k in PRIVACY_KEYS}

    def as_dict(self) -> dict:
        return asdict(self)


def steps_planned(num_epochs: int, iterations_per_epoch: int) -> int:
    return int(num_epochs) * int(iterations_per_epoch)


def noise_for_schedule(settings: DPSettings, steps: int) -> float:
    """sigma: the given one, or the smallest that spends target_epsilon in ``steps`` steps at
    rate q under the run's accountant (add/remove, Poisson)."""
    if settings.noise_multiplier is not None:
        return float(settings.noise_multiplier)
    from dpseg.privacy.accountants import noise_for_epsilon

    sigma = noise_for_epsilon(
        settings.target_epsilon, settings.delta, settings.sample_rate, steps, settings.accountant
    )
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"no noise multiplier spends epsilon {settings.target_epsilon}")
    return sigma
