"""The accountants: Opacus's own, by the names Opacus uses ("prv", "rdp", "gdp")."""

from __future__ import annotations

import warnings

from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

ACCOUNTANTS: dict[str, type[IAccountant]] = {
    "prv": PRVAccountant,
    "rdp": RDPAccountant,
    "gdp": GaussianAccountant,
}

GDP_WARNING = (
    "accountant='gdp' (Gaussian DP through the central limit theorem) can underestimate "
    "epsilon, most at small sample rates and few steps (https://arxiv.org/abs/2106.02848), "
    "and it needs the noise multiplier and sample rate constant over the whole run (a "
    "change raises). Prefer 'prv' (the default) or 'rdp' for a guarantee you report."
)


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; use one of {sorted(ACCOUNTANTS)}")
    if name == "gdp":
        warnings.warn(GDP_WARNING, UserWarning, stacklevel=3)
        with warnings.catch_warnings():  # Opacus's own, shorter warning says the same
            warnings.simplefilter("ignore")
            return GaussianAccountant()
    return ACCOUNTANTS[name]()


def steps_accounted(accountant: IAccountant) -> int:
    """How many DP steps the accountant's history holds (each entry: sigma, q, steps)."""
    return sum(int(entry[2]) for entry in accountant.history)
