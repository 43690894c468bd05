"""The in-process federation: a server holding the global weights and a strategy, and the
sites, run round by round in one process.

A round: sample sites -> each trains from the global weights (``Site.fit``) -> the strategy
aggregates the updates that came back -> evaluate the new global model -> checkpoint. A
site that raises is logged and left out of the round; a site whose budget is spent says so
and is not sampled again; the run goes on while any site can train.

Sampling: without client-level DP, round(fraction * K) distinct sites (at least one) among
those that can still train, drawn uniformly (Flower's fraction_fit). With client-level DP,
each site is taken independently with probability q = fraction (Poisson sampling, which is
what the accountant of the server's ledger assumes).

Randomness: the sampling of sites and the client-level noise of round r are keyed by the
server's secret and r; each site keys its own (site.py). ``secret`` is the federation's
(dpseg.privacy.secret: the run's OUT/secret.key, or --secret-seed); without one the server
and every site it is given draw their own from OS entropy.

Checkpoints (``save``/``load``) hold the round, global weights, strategy state, every
site's state (optimizer, ledger, step count), the server ledger and the history, and no
secret: neither generator states nor noise seeds. They are written by
dpseg.train.checkpoint (a temporary file renamed over the old one, so a kill at any moment
leaves either the previous or the new checkpoint, never a torn one; loaded with
weights_only=True).
"""

from __future__ import annotations

import logging
import secrets
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dpseg.federated.ledger import PrivacyLedger, make_accountant
from dpseg.federated.site import BudgetExhausted, Site
from dpseg.federated.strategies import (
    ClientLevelDP,
    SiteUpdate,
    Strategy,
    Weights,
    trainable_state,
    update_norm,
)
from dpseg.federated.update_checks import nonfinite, screen_updates
from dpseg.privacy.secret import derive_seed, server_secret
from dpseg.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["FEDERATED_FORMAT", "Simulator"]

log = logging.getLogger("dpseg.federated")
FEDERATED_FORMAT = 1  # inside dpseg.train.checkpoint's own format tag


class Simulator:
    def __init__(
        self,
        sites: list[Site],
        model: nn.Module,
        strategy: Strategy,
        *,
        local_steps: int | None = None,
        local_epochs: int | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        secret: int | None = None,
        evaluate: Callable[[nn.Module], dict] | None = None,
        client_dp: dict | None = None,
        label: str = "",
        train_sites: tuple[str, ...] = (),
        lr_schedule: Callable[[int], float] | None = None,
        max_update_norm: float | None = None,
    ):
        if not sites:
            raise ValueError("a federation needs at least one site")
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be distinct, got {names}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction of sites per round must be in (0, 1], got {fraction}")
        if (local_steps is None) == (local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs")
        unknown = sorted(set(train_sites) - set(names))
        if unknown:
            raise ValueError(f"train_sites {unknown} are not sites of this run ({names})")
        # Sites outside train_sites never train; every site's held-out cases still count
        # (a site trained alone, scored on every scanner's patients).
        self.train_sites = tuple(train_sites) or tuple(names)
        self.sites, self.model, self.fraction = sites, model, float(fraction)
        self.local_steps, self.local_epochs = local_steps, local_epochs
        self.evaluate_fn, self.label = evaluate, label
        self.lr_schedule = lr_schedule  # round -> factor on the sites' learning rate
        self.max_update_norm = max_update_norm  # the server's cap (update_checks.py)
        self.weights = trainable_state(model)
        self.round = 0
        self.history: list[dict] = []
        # Which sites take part in round r, and the client-level noise, are keyed by the
        # server's secret and r (never by the public seed alone, and never saved).
        own = secrets.randbits(63) if secret is None else server_secret(secret)
        self._key = derive_seed(seed, own)
        self.server_ledger: PrivacyLedger | None = None
        self.strategy = strategy
        if client_dp is not None:
            expected = self.fraction * len(sites)
            self.strategy = ClientLevelDP(
                strategy, client_dp["clip"], client_dp["noise_multiplier"], expected,
                seed=derive_seed(self._key, 2),
            )  # fmt: skip
            self.server_ledger = PrivacyLedger(
                make_accountant(client_dp.get("accountant", "rdp")), client_dp["delta"], "server"
            )

    # --- rounds ------------------------------------------------------------------------------
    def active_sites(self) -> list[Site]:
        return [s for s in self.sites if not s.exhausted and s.name in self.train_sites]

    def sample(self) -> list[Site]:
        """The sites of the next round (round self.round + 1)."""
        rng = np.random.default_rng([self._key, 1, self.round + 1])
        if self.server_ledger is not None:
            keep = rng.random(len(self.sites)) < self.fraction
            active = {s.name for s in self.active_sites()}  # names: RemoteSite is unhashable
            return [s for s, k in zip(self.sites, keep, strict=True) if k and s.name in active]
        active = self.active_sites()
        if not active:
            return []
        m = min(len(active), max(1, round(self.fraction * len(self.train_sites))))
        chosen = sorted(rng.choice(len(active), size=m, replace=False).tolist())
        return [active[i] for i in chosen]

    def close_round(self, record: dict, r: int) -> None:
        """After aggregation: the update's norm, the new global model, and the round's
        client-level privacy cost (shared with the Flower ServerApp)."""
        record["update_norm"] = update_norm(
            {k: self.weights[k] - v for k, v in trainable_state(self.model).items()}
        )
        self.model.load_state_dict(self.weights, strict=False)
        if self.server_ledger is not None:
            self.server_ledger.accountant.step(
                noise_multiplier=self.strategy.noise_multiplier, sample_rate=self.fraction
            )
            record["client_epsilon"] = self.server_ledger.record_round(r)["epsilon"]
            record["clipped_sites"] = list(self.strategy.last_clipped)

    def aggregate(self, updates: list[SiteUpdate], record: dict) -> None:
        """Checks each update (update_checks.py), aggregates those accepted and takes the
        server step (shared with the Flower ServerApp)."""
        accepted, refused = screen_updates(self.weights, updates, self.max_update_norm)
        for r in refused:
            record["sites"][r["site"]].update(status="refused", refused=r["reason"])
            log.error("%s round %d: the update of site %s is refused: %s",
                      self.label, record["round"], r["site"], r["reason"])  # fmt: skip
        record["refused"] = refused
        record["took_part"] = [u.site for u in accepted]  # the sites whose update was averaged
        if accepted or self.server_ledger is not None:
            self.server_step(lambda: self.strategy.aggregate(self.weights, accepted), record)

    def server_step(self, step: Callable[[], Weights], record: dict) -> None:
        """Takes ``step()`` as the new global model unless it holds a non-finite value: then
        the round is refused, and the model and the strategy's moments stay as they were."""
        before = self.strategy.state_dict()
        new = step()
        bad = nonfinite(new)
        if not bad:
            self.weights = new
            return
        self.strategy.load_state_dict(before)  # (client-level noise is keyed by the round)
        record["refused_round"] = f"the new global model is not finite (in {bad[:3]})"
        log.error("%s round %d refused: %s", self.label, record["round"], record["refused_round"])

    def fit_config(self, r: int) -> dict:
        """What each chosen site is told for round r: the strategy's settings (FedProx's mu)
        and, with a schedule, the factor on its learning rate."""
        config = dict(self.strategy.configure_fit(r))
        if self.lr_schedule is not None:
            config["lr_scale"] = float(self.lr_schedule(r))
        return config

    def run_round(self, progress: bool = False) -> dict:
        """One round; returns its record (also appended to ``history``)."""
        r = self.round + 1
        chosen = self.sample()
        config = self.fit_config(r)
        steps = {s.name: s.steps_for(self.local_steps, self.local_epochs) for s in chosen}
        record: dict = {"round": r, "sampled": [s.name for s in chosen], "sites": {}}
        bar = tqdm(
            total=sum(steps.values()), desc=f"{self.label + ' ' if self.label else ''}round {r}",
            unit="step", disable=None if progress else True, leave=False,  # None: no bar in a log
        )  # fmt: skip
        updates = []
        start, cpu_start = time.perf_counter(), time.process_time()
        for site in self.sites:
            entry: dict = {"status": "idle", "seconds": 0.0, "steps": 0}
            record["sites"][site.name] = entry
            if site not in chosen:
                if site.exhausted:
                    entry["status"] = "budget"
                continue
            bar.set_postfix(site=site.name)
            try:
                update = site.fit(self.weights, steps[site.name], config, lambda _: bar.update())
            except BudgetExhausted as exc:
                entry.update(status="budget", message=str(exc))
                log.warning("%s round %d: site %s %s", self.label, r, site.name, exc)
                tqdm.write(f"{self.label} round {r}: site {site.name}: {exc}")
                continue
            except Exception as exc:  # a failing site must not stop the federation
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                log.error("%s round %d: site %s failed:\n%s", self.label, r, site.name,
                          traceback.format_exc())  # fmt: skip
                tqdm.write(
                    f"{self.label} round {r}: site {site.name} failed ({type(exc).__name__}: "
                    f"{exc}); left out of this round's average"
                )
                continue
            entry.update(
                status="ok", seconds=update.seconds, steps=update.steps, loss=update.loss,
                cpu_seconds=update.metrics.get("cpu_seconds"),
            )  # fmt: skip
            updates.append(update)
        bar.close()
        record["retried"] = {}  # in-process nothing is resent (Flower: a restarted node's)
        agg_start = time.perf_counter()
        self.aggregate(updates, record)
        record["aggregate_seconds"] = time.perf_counter() - agg_start
        record["seconds"] = time.perf_counter() - start
        # CPU seconds of this process: on a CPU shared with other jobs they measure the work
        # done rather than the time spent waiting for a core, so their ratios are steadier.
        record["cpu_seconds"] = time.process_time() - cpu_start
        self.close_round(record, r)
        for site in self.sites:
            entry = record["sites"][site.name]
            entry["epsilon"] = site.ledger.record_round(r)["epsilon"] if site.ledger else None
        eval_start = time.perf_counter()
        if self.evaluate_fn is not None:
            scores = self.evaluate_fn(self.model)
            record["pooled_dice"] = scores.get("pooled")
            record["pooled_dice_largest_component"] = scores.get("pooled_largest_component")
            if "cases" in scores:
                record["cases"] = scores["cases"]  # [dice, with the largest component] a case
            for name, dice in scores.get("sites", {}).items():
                record["sites"][name]["dice"] = dice
            for name, dice in scores.get("sites_largest_component", {}).items():
                record["sites"][name]["dice_largest_component"] = dice
        record["eval_seconds"] = time.perf_counter() - eval_start
        self.round = r
        self.history.append(record)
        return record

    def run(
        self,
        rounds: int,
        checkpoint: str | Path | None = None,
        progress: bool = False,
        on_round: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """Rounds up to ``rounds`` in total (a resumed run continues from ``self.round``)."""
        while self.round < rounds:
            if not self.active_sites():
                tqdm.write(f"{self.label}: every site has spent its privacy budget; stopping")
                break
            record = self.run_round(progress)
            if checkpoint is not None:
                self.save(checkpoint)
            if on_round is not None:
                on_round(record)
        return self.history

    @property
    def done(self) -> bool:
        return not self.active_sites()

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "federated": FEDERATED_FORMAT,
            "round": self.round,
            "weights": {k: v.detach().cpu().clone() for k, v in self.weights.items()},
            "strategy": self.strategy.state_dict(),
            "sites": {s.name: s.state_dict() for s in self.sites},
            "server_ledger": self.server_ledger.state_dict() if self.server_ledger else None,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("federated") != FEDERATED_FORMAT:
            raise ValueError(
                "not a checkpoint of a federated run (dpseg federate writes "
                "RUN/checkpoint_<engine>.pt)"
            )
        missing = sorted({s.name for s in self.sites} - set(state["sites"]))
        if missing:
            raise ValueError(f"the checkpoint has no state for site(s) {missing}")
        self.round = int(state["round"])
        self.weights = dict(state["weights"])
        self.model.load_state_dict(self.weights, strict=False)
        self.strategy.load_state_dict(state["strategy"])
        for s in self.sites:
            s.load_state_dict(state["sites"][s.name])
        if self.server_ledger is not None and state["server_ledger"] is not None:
            self.server_ledger.load_state_dict(state["server_ledger"])
        self.history = list(state["history"])
        torch.set_rng_state(state["torch_rng"])

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Atomic (temporary file + rename) through dpseg.train.checkpoint."""
        save_checkpoint(path, {**self.state_dict(), "extra": extra or {}})

    def load(self, path: str | Path) -> dict:
        state = load_checkpoint(path)
        self.load_state_dict(state)
        return state.get("extra", {})
