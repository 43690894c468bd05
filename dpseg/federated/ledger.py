"""The privacy ledger: what one party (a site, or the server for client-level DP) has spent.

The accountant is an Opacus accountant (RDP or PRV) shared with the DP engine, which steps
it at every DP-SGD step with (sigma, q); the ledger adds the round structure on top: after
each round it records the cumulative steps and epsilon, and it answers "what would epsilon
be after k more steps?" so a site can refuse a round that would overspend its budget
rather than notice afterwards. Its state is the accountant history plus those records, so
a resumed run continues from the same point: epsilon never resets.
"""

from __future__ import annotations

import functools
import math

from opacus.accountants.accountant import IAccountant

from dpseg.privacy.accountants import ACCOUNTANTS, make_accountant

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "make_accountant"]


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(cls: type[IAccountant], history: tuple, delta: float) -> float:
    acc = cls()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _epsilon(cls: type[IAccountant], history: list[tuple], delta: float) -> float:
    # Cached: a get_epsilon costs 0.3-0.8 s on the 2-core CPU (RDP's fractional orders, PRV's
    # FFT), and every engine of a --compare run asks it of the same histories.
    if not history:
        return 0.0
    return _epsilon_cached(cls, tuple(tuple(h) for h in history), float(delta))


class PrivacyLedger:
    """Rounds and epsilon of one party. ``accountant`` may be shared with a DP engine."""

    def __init__(
        self, accountant: IAccountant, delta: float, owner: str = "", unit: str | None = None
    ):
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.accountant, self.delta, self.owner = accountant, float(delta), owner
        self.unit = unit  # what the epsilon protects ("patient", "case"; None: the server's)
        self.records: list[dict] = []
        self._cache: tuple[tuple, float] | None = None

    @property
    def history(self) -> list[tuple]:
        return [tuple(h) for h in self.accountant.history]

    @property
    def steps(self) -> int:
        return int(sum(h[2] for h in self.accountant.history))

    @property
    def epsilon(self) -> float:
        key = tuple(self.history)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _epsilon(type(self.accountant), list(key), self.delta))
        return self._cache[1]

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more DP steps at (sigma, q), without taking them."""
        if steps <= 0:
            return self.epsilon
        if noise_multiplier == 0:
            return math.inf
        extra = [(float(noise_multiplier), float(sample_rate), int(steps))]
        return _epsilon(type(self.accountant), self.history + extra, self.delta)

    def record_round(self, server_round: int, **extra) -> dict:
        rec = {"round": int(server_round), "steps": self.steps, "epsilon": self.epsilon, **extra}
        self.records.append(rec)
        return rec

    def state_dict(self) -> dict:
        state = {
            "mechanism": self.accountant.mechanism(),
            "delta": self.delta,
            "history": self.history,
            "records": [dict(r) for r in self.records],
        }
        if self.unit is not None:
            state["unit"] = self.unit
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["mechanism"] != self.accountant.mechanism():
            raise ValueError(
                f"ledger of {self.owner or 'this party'} was kept with the "
                f"{state['mechanism']!r} accountant, this run uses "
                f"{self.accountant.mechanism()!r}; resume with the same --accountant"
            )
        theirs = state.get("unit")  # (a ledger older than the unit's name: taken as ours)
        if self.unit is not None and theirs is not None and theirs != self.unit:
            raise ValueError(
                f"ledger of {self.owner or 'this party'} is per {theirs}, this run's per "
                f"{self.unit}; resume with --privacy-unit {theirs}"
            )
        self.accountant.history = [tuple(h) for h in state["history"]]
        self.records = [dict(r) for r in state["records"]]
        self._cache = None
