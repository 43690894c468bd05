"""Empirical privacy audit: the epsilon dpseg's DP step actually leaks, measured.

from dpseg.audit import AuditConfig, run_audit
result = run_audit(AuditConfig(noise_multiplier=1.0, trials=1_000_000))
result.epsilon_lower <= result.epsilon_claimed   # else the engine leaks more than it says
"""

from dpseg.audit.auditor import PATHS, AuditConfig, AuditResult, run_audit, trial_scores
from dpseg.audit.statistics import (
    clopper_pearson_upper,
    epsilon_lower_bound,
    epsilon_of_gdp,
    gdp_epsilon,
    log_likelihood_ratio,
)

__all__ = [
    "PATHS",
    "AuditConfig",
    "AuditResult",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "epsilon_of_gdp",
    "gdp_epsilon",
    "log_likelihood_ratio",
    "run_audit",
    "trial_scores",
]
