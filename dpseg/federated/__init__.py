"""Federated training in one process: sites with per-site DP and privacy ledgers, server
strategies (FedAvg, FedProx, FedAdam, FedYogi, client-level DP), and `dpseg federate`."""

from dpseg.federated.ledger import PrivacyLedger
from dpseg.federated.simulator import Simulator
from dpseg.federated.site import BudgetExhausted, Site, SiteConfig
from dpseg.federated.strategies import (
    ClientLevelDP,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    SiteUpdate,
    Strategy,
    make_strategy,
)

__all__ = [
    "BudgetExhausted",
    "ClientLevelDP",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "PrivacyLedger",
    "Simulator",
    "Site",
    "SiteConfig",
    "SiteUpdate",
    "Strategy",
    "make_strategy",
]
