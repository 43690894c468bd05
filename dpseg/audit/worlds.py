"""The add/remove audit: two worlds that differ by one patient, so the dataset's size does.

The slot audit (dpseg.audit.auditor) holds N fixed inside each run: it sees the step, not
what surrounds it. Here each run is one world: the ordinary patients alone (N), or with a
canary patient added (N + 1), trained through everything a user's run goes through: the
user's DataLoader, make_private's Poisson loader, the collate, the normaliser and the
number of steps a pass. The auditor sees every released update in raw form (the change of
the weights, SGD at learning rate 1, never multiplied back by the optimizer's divisor,
which would cancel a divisor that moves with N) and how many there were.

Scores per run (world 1 is the one with the canary):
- ``canary``: the canary coordinate summed over the released updates (the patient itself);
- ``energy`` and ``-energy``: the sum of the updates' squared norms, which sees their scale
  and their count. With zero gradients everywhere but the canary, it is the noise's energy,
  sigma^2 C^2 P T / E^2: a normaliser E or a step count T that moves with N moves it, and
  with P parameters its relative spread is only about 1/sqrt(2 P T) (issue 23: N = 100 and
  101 told apart in 200 of 200 trials with Opacus's convention).
Each score gets its own lower bound at a third of the error budget (a union bound over the
three), and the largest is reported.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpseg.audit.statistics import epsilon_lower_bound
from dpseg.privacy import PrivacyEngine

SCORES = ("canary", "energy", "-energy")


@dataclass
class WorldsConfig:
    noise_multiplier: float = 1.0
    patients: int = 100  # N: world 0's patients; world 1 adds the canary patient
    batch_size: int = 10  # the user's DataLoader batch (what Opacus's convention reads)
    sample_rate: float | None = 0.1  # declared q; None: Opacus's convention, from N
    expected_batch_size: float | None = 10.0  # declared normaliser; None: from N
    epochs: int = 1  # passes over the DP loader
    dims: int = 2000  # model parameters besides the canary's coordinate
    rows_per_canary: int = 1  # the canary patient's rows, as k declared items
    runs: int = 400  # per world
    magnitude: float = 4.0  # the canary's gradient norm, in units of C
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    confidence: float = 0.95
    accountant: str = "prv"
    backend: str = "auto"
    seed: int = 0

    def check(self) -> None:
        if self.patients < 1 or self.batch_size < 1 or self.epochs < 1 or self.dims < 1:
            raise ValueError("patients, batch_size, epochs and dims must be >= 1")
        if self.runs < 16:
            raise ValueError(f"runs must be >= 16 per world, got {self.runs}")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.rows_per_canary < 1:
            raise ValueError("rows_per_canary must be >= 1")


@dataclass
class WorldsResult:
    noise_multiplier: float
    patients: int
    sample_rate: float | None
    expected_batch_size: float | None
    epochs: int
    runs: int  # per world
    rows_per_canary: int
    epsilon_claimed: float | None
    adjacency: str  # what the claim is for
    epsilon_lower: float  # the largest of the three scores' bounds
    best_score: str
    bounds: dict  # score -> lower bound
    steps: dict  # world -> distinct numbers of released updates seen
    confidence: float
    delta: float
    accountant: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1)


def _one_run(cfg: WorldsConfig, run: int, world: int):
    """(canary score, energy, steps released, engine) of one run in ``world``."""
    n, k, d = cfg.patients, cfg.rows_per_canary, cfg.dims + 1
    x = torch.zeros(n + world * k, d)
    patient_ids = list(range(n))
    if world:  # the canary patient: k rows whose gradient is magnitude * C in coordinate 0
        x[n:, 0] = cfg.magnitude * cfg.max_grad_norm
        patient_ids += [n] * k
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    engine = PrivacyEngine(accountant=cfg.accountant)
    declared = {}
    if cfg.sample_rate is not None:
        declared["sample_rate"] = cfg.sample_rate
    if cfg.expected_batch_size is not None:
        declared["expected_batch_size"] = cfg.expected_batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the claim is about: in the result
        pmodel, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(x), batch_size=cfg.batch_size),
            noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            backend=cfg.backend,
            noise_seed=_seed(cfg.seed, world, run, 2),
            patient_ids=patient_ids if k > 1 else None,
            items_per_patient=k if k > 1 else 1,
            **declared,
        )
    loader.batch_sampler.generator = torch.Generator().manual_seed(_seed(cfg.seed, world, run, 1))
    canary, energy, steps = 0.0, 0.0, 0
    last = model.weight.detach()[0].clone()
    for _ in range(cfg.epochs):
        for (xb,) in loader:
            optimizer.zero_grad()
            (pmodel(xb).sum() / max(1, len(xb))).backward()  # the mean; 0 when empty
            optimizer.step()
            now = model.weight.detach()[0].clone()
            update = (last - now).to(torch.float64)  # raw: the released update itself
            last = now
            canary += float(update[0])
            energy += float(update.square().sum())
            steps += 1
    return canary, energy, steps, engine


def run_worlds_audit(
    cfg: WorldsConfig, progress: Callable[[int, int], None] | None = None
) -> WorldsResult:
    cfg.check()
    start = time.perf_counter()
    scores = {world: {name: [] for name in SCORES} for world in (0, 1)}
    steps = {0: set(), 1: set()}
    claimed, adjacency = None, None
    total = 2 * cfg.runs
    for run in range(cfg.runs):
        for world in (0, 1):
            canary, energy, t, engine = _one_run(cfg, run, world)
            scores[world]["canary"].append(canary)
            scores[world]["energy"].append(energy)
            scores[world]["-energy"].append(-energy)
            steps[world].add(t)
            if world == 0 and claimed is None:
                adjacency = engine.guarantee.adjacency
                if cfg.noise_multiplier > 0:
                    claimed = engine.get_epsilon(cfg.delta)
            if progress:
                progress(2 * run + world + 1, total)
    confidence = 1 - (1 - cfg.confidence) / len(SCORES)  # a union bound over the scores
    bounds = {}
    for i, name in enumerate(SCORES):
        bound = epsilon_lower_bound(
            np.array(scores[0][name]),
            np.array(scores[1][name]),
            cfg.delta,
            confidence,
            rng=np.random.default_rng(_seed(cfg.seed, 1 << 30, i)),
        )
        bounds[name] = bound.epsilon
    best = max(bounds, key=bounds.get)
    return WorldsResult(
        noise_multiplier=cfg.noise_multiplier,
        patients=cfg.patients,
        sample_rate=cfg.sample_rate,
        expected_batch_size=cfg.expected_batch_size,
        epochs=cfg.epochs,
        runs=cfg.runs,
        rows_per_canary=cfg.rows_per_canary,
        epsilon_claimed=claimed,
        adjacency=adjacency,
        epsilon_lower=bounds[best],
        best_score=best,
        bounds=bounds,
        steps={w: sorted(s) for w, s in steps.items()},
        confidence=cfg.confidence,
        delta=cfg.delta,
        accountant=cfg.accountant,
        seconds=time.perf_counter() - start,
    )


def verdict(r: WorldsResult) -> str:
    if r.epsilon_claimed is None or not math.isfinite(r.epsilon_claimed):
        return "no claim (no noise)"
    if r.adjacency != "add/remove":
        return f"claim is for {r.adjacency}: N is public, add/remove not claimed"
    if r.epsilon_lower > r.epsilon_claimed:
        return "LEAKS: measured above the claim"
    return "ok"


def worlds_markdown(results: list[WorldsResult], command: str) -> str:
    lines = [
        "# Privacy audit: add/remove worlds",
        "",
        f"`{command}`",
        "",
        "One world a run: N patients, or N + 1 with a canary patient, through the real "
        "loader, collate, normaliser and steps a pass; scored on the raw released updates. "
        "Three scores (the canary coordinate, the updates' energy, its negative), each bound "
        "at a third of the error budget.",
        "",
        "| sigma | N | q | normaliser | runs / world | steps (world 0 / 1) | claimed "
        "(adjacency) | lower (95%) | score | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        claimed = "inf" if r.epsilon_claimed is None else f"{r.epsilon_claimed:.2f}"
        lines.append(
            f"| {r.noise_multiplier:g} | {r.patients} | {r.sample_rate or 'from N'} | "
            f"{r.expected_batch_size or 'from N'} | {r.runs} | {r.steps[0]} / {r.steps[1]} | "
            f"{claimed} ({r.adjacency}) | {r.epsilon_lower:.2f} | {r.best_score} | "
            f"{verdict(r)} |"
        )
    return "\n".join(lines) + "\n"
