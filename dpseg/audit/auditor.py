"""The many-run white-box audit of dpseg's DP step.

Each run is a fresh training run of the canary model (dpseg.audit.canaries) through the
real engine: ``PrivacyEngine.make_private`` on a Poisson loader (dpseg's DPDataLoader at
rate q), ``T`` calls of ``DPOptimizer.step()`` (or, on the "batch_memory_manager" path,
BatchMemoryManager's physical batches and skipped steps), SGD with learning rate 1. The
auditor sees every released iterate: the change of each slot's weight at each step, in units
of C, is one observation of that slot's trial. Scores are the likelihood-ratio statistic
under the claimed mechanism (dpseg.audit.statistics), the bound is Clopper-Pearson on a
held-out quarter, and the claim is the engine's own accountant after the run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dpseg.audit.canaries import (
    CanaryDataset,
    MultiSampleCanaries,
    canary_model,
    collate_batch,
    make_inputs,
    patient_rows,
    spread_over_tokens,
)
from dpseg.audit.statistics import epsilon_lower_bound, gdp_epsilon, log_likelihood_ratio
from dpseg.privacy import BatchMemoryManager, DPDataLoader, PrivacyEngine

PATHS = ("plain", "batch_memory_manager", "ddp")
DDP_WORLD = 2  # the "ddp" path: two gloo processes, the model wrapped in DDP
# How a canary patient of k rows reaches the step: as one dataset item holding a list of its
# k samples (MONAI's multi-sample transforms; collated by dpseg's flatten_collate or MONAI's
# list_data_collate), or as k items of a declared patient (make_private(patient_ids=...)).
CANARY_LAYOUTS = ("multi-sample", "patients")
# How a sample reaches the layer: one row (flat), T tokens of one row ((B, T, D): the Linear
# rule's per-sample sum over positions), or windows of two tokens, each window a row of its
# own ((B x windows, 2, D): the rows Swin's window attention sees, summed back per sample).
STRUCTURES = ("flat", "tokens", "windows")
COLLATES = ("dpseg", "monai")


@dataclass
class AuditConfig:
    noise_multiplier: float = 1.0
    steps: int = 1
    sample_rate: float = 1.0
    trials: int = 1_000_000  # per world
    delta: float = 1e-5
    confidence: float = 0.95
    backend: str = "auto"
    path: str = "plain"
    physical_batch: int | None = None  # batch_memory_manager: default a quarter of E[B]
    slots: int = 4000  # trials per run: half world 0, half world 1
    ordinary: int = 16
    data_dims: int = 64
    magnitude: float = 4.0  # canary gradient norm, in units of C
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    seed: int = 0
    device: str = "cpu"
    rows_per_canary: int = 1  # k: a canary patient's rows, clipped as one unit
    canary_layout: str = "multi-sample"  # with k > 1: one of CANARY_LAYOUTS
    collate: str = "dpseg"  # the multi-sample layout's collate: one of COLLATES
    structure: str = "flat"  # one of STRUCTURES
    tokens: int = 4  # tokens a sample under "tokens" and "windows"

    def check(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be an int >= 1, got {self.steps}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.slots < 2 or self.slots % 2:
            raise ValueError(f"slots must be an even number >= 2, got {self.slots}")
        if self.trials < 8:
            raise ValueError(f"trials must be >= 8 per world, got {self.trials}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if not (isinstance(self.rows_per_canary, int) and self.rows_per_canary >= 1):
            raise ValueError(f"rows_per_canary must be an int >= 1, got {self.rows_per_canary}")
        if self.canary_layout not in CANARY_LAYOUTS:
            raise ValueError(f"canary_layout must be one of {CANARY_LAYOUTS}")
        if self.collate not in COLLATES:
            raise ValueError(f"collate must be one of {COLLATES}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}")
        if self.structure == "windows" and (self.tokens < 2 or self.tokens % 2):
            raise ValueError(f"windows of two tokens need an even tokens >= 2, got {self.tokens}")
        if not self.magnitude > 1:
            raise ValueError(
                f"magnitude must be > 1 (the canary's gradient must exceed C), got {self.magnitude}"
            )

    @property
    def runs(self) -> int:
        return math.ceil(self.trials / (self.slots // 2))


@dataclass
class AuditResult:
    noise_multiplier: float
    steps: int
    sample_rate: float
    delta: float
    trials: int  # per world
    confidence: float
    epsilon_claimed: float | None  # None: infinite (no noise)
    epsilon_lower: float
    backend: str
    path: str
    accountant: str
    threshold: float
    alpha_upper: float
    beta_upper: float
    false_positives: int
    false_negatives: int
    evaluated_trials: list[int]
    mu_gdp: float
    epsilon_gdp: float
    runs: int
    seconds: float
    rows_per_canary: int = 1
    canary_layout: str = "rows"
    unit: str = "item"
    adjacency: str = "add/remove"
    structure: str = "flat"

    def as_dict(self) -> dict:
        return asdict(self)


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1)


def _one_run(cfg: AuditConfig, run: int):
    """(world-0 observations, world-1 observations, engine): each (slots/2, steps), in
    units of C."""
    gen = torch.Generator().manual_seed(_seed(cfg.seed, run, 0))
    perm = torch.randperm(cfg.slots, generator=gen)
    world1, world0 = perm[: cfg.slots // 2], perm[cfg.slots // 2 :]
    x = make_inputs(
        world1, cfg.slots, cfg.data_dims, cfg.ordinary, cfg.max_grad_norm, cfg.magnitude, gen,
        device=cfg.device,
    )  # fmt: skip
    if cfg.structure != "flat":
        x = spread_over_tokens(x, cfg.tokens)
    distributed = torch.distributed.is_initialized()
    shard = (torch.distributed.get_rank(), DDP_WORLD) if distributed else None
    units = len(x)  # canaries and ordinary samples: the same count in both worlds
    dataset, collate, patient_ids, k = CanaryDataset(x), collate_batch, None, cfg.rows_per_canary
    if k > 1:  # a canary patient of k identical rows: clipped as one, it moves its slot by C
        rows, counts = patient_rows(x, len(world1), k)
        if cfg.canary_layout == "multi-sample":
            dataset, collate = MultiSampleCanaries(rows, counts), _multi_sample_collate(cfg)
        else:
            dataset = CanaryDataset(rows)
            patient_ids = [p for p, n in enumerate(counts) for _ in range(n)]
    loader = DPDataLoader(
        dataset,
        sample_rate=cfg.sample_rate,
        steps=cfg.steps,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(_seed(cfg.seed, run, 1)),
        distributed=shard,  # each rank its share of one Poisson draw
    )
    model = canary_model(
        cfg.slots, cfg.data_dims, device=cfg.device, structure=cfg.structure, tokens=cfg.tokens
    )
    engine = PrivacyEngine(accountant=cfg.accountant)
    wrapped = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the epsilon is about: said in the report
        pmodel, optimizer, loader = engine.make_private(
            module=wrapped,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=loader,
            noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            backend=cfg.backend,
            noise_seed=_seed(cfg.seed, run, 2),
            expected_batch_size=units * cfg.sample_rate,  # a constant of the audit
            patient_ids=patient_ids,
            items_per_patient=k if patient_ids is not None else 1,
        )
    released = []
    last = model.weight.detach()[0, : cfg.slots].clone()

    def train_on(xb) -> None:
        optimizer.zero_grad()
        (pmodel(xb).sum() / max(1, len(xb))).backward()  # the mean; 0 for an empty batch
        before = optimizer.steps_taken
        optimizer.step()
        if optimizer.steps_taken > before:  # an update was released
            nonlocal last
            now = model.weight.detach()[0, : cfg.slots].clone()
            released.append(last - now)  # lr 1: the noised, clipped gradient itself
            last = now

    if cfg.path in ("plain", "ddp"):
        for (xb,) in loader:
            train_on(xb)
    else:
        expected = max(1, int(units * cfg.sample_rate))
        physical = max(cfg.physical_batch or max(1, expected // 4), k)
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
        ) as batches:
            for (xb,) in batches:
                train_on(xb)
    if len(released) != cfg.steps:
        raise RuntimeError(f"run {run}: {len(released)} updates released for {cfg.steps} steps")
    # grad = (sum of clipped + sigma C z) / E[B]: in units of C, N(1 or 0, sigma^2).
    obs = torch.stack(released).to(torch.float64) * optimizer.expected_batch_size
    obs = (obs / cfg.max_grad_norm).cpu().numpy()  # (steps, slots)
    return obs[:, world0.numpy()].T, obs[:, world1.numpy()].T, engine


def _multi_sample_collate(cfg: AuditConfig):
    if cfg.collate == "monai":
        from monai.data import list_data_collate

        return list_data_collate
    from dpseg.data import flatten_collate

    return flatten_collate


def trial_scores(
    cfg: AuditConfig, progress: Callable[[int, int], None] | None = None
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(world-0 scores, world-1 scores, epsilon claimed), ``cfg.trials`` of each.

    The scores are a function of (config, seed) alone: two backends or paths that release
    the same bits give the same scores, hence the same bound."""
    cfg.check()
    if cfg.path == "ddp" and not torch.distributed.is_initialized():
        return _scores_on_ranks(cfg, progress)
    scores0, scores1, history, claimed = [], [], None, None
    for run in range(cfg.runs):
        obs0, obs1, engine = _one_run(cfg, run)
        scores0.append(log_likelihood_ratio(obs0, cfg.noise_multiplier, cfg.sample_rate))
        scores1.append(log_likelihood_ratio(obs1, cfg.noise_multiplier, cfg.sample_rate))
        if history is None:
            history = list(engine.accountant.history)
            if cfg.noise_multiplier > 0:
                claimed = engine.get_epsilon(cfg.delta)
        elif list(engine.accountant.history) != history:
            raise RuntimeError(f"run {run} was accounted differently: {engine.accountant.history}")
        if progress:
            progress(run + 1, cfg.runs)
    return np.concatenate(scores0)[: cfg.trials], np.concatenate(scores1)[: cfg.trials], claimed


def _scores_on_ranks(cfg: AuditConfig, progress) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The "ddp" path: the same runs on DDP_WORLD gloo processes of this machine; every
    replica releases the same update, and rank 0 scores it."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/scores.npz"
        mp.spawn(_rank_worker, args=(port, asdict(cfg), out), nprocs=DDP_WORLD, join=True)
        saved = np.load(out)
        claimed = float(saved["claimed"][0]) if saved["claimed"].size else None
        if progress:
            progress(cfg.runs, cfg.runs)
        return saved["s0"], saved["s1"], claimed


def _rank_worker(rank: int, port: int, cfg_dict: dict, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=DDP_WORLD)
    try:
        s0, s1, claimed = trial_scores(AuditConfig(**cfg_dict))
        if rank == 0:
            np.savez(out, s0=s0, s1=s1, claimed=np.array([] if claimed is None else [claimed]))
    finally:
        dist.destroy_process_group()


def run_audit(cfg: AuditConfig, progress: Callable[[int, int], None] | None = None) -> AuditResult:
    """``progress(done, total)`` is called after each run."""
    start = time.perf_counter()
    s0, s1, claimed = trial_scores(cfg, progress)
    bound = epsilon_lower_bound(
        s0, s1, cfg.delta, cfg.confidence, rng=np.random.default_rng(_seed(cfg.seed, 1 << 30))
    )
    mu, eps_gdp = gdp_epsilon(bound, cfg.delta)
    return AuditResult(
        noise_multiplier=cfg.noise_multiplier,
        steps=cfg.steps,
        sample_rate=cfg.sample_rate,
        delta=cfg.delta,
        trials=len(s0),
        confidence=cfg.confidence,
        epsilon_claimed=claimed,
        epsilon_lower=bound.epsilon,
        backend=cfg.backend,
        path=cfg.path,
        accountant=cfg.accountant,
        threshold=bound.threshold,
        alpha_upper=bound.alpha_upper,
        beta_upper=bound.beta_upper,
        false_positives=bound.false_positives,
        false_negatives=bound.false_negatives,
        evaluated_trials=list(bound.evaluated),
        mu_gdp=mu,
        epsilon_gdp=eps_gdp,
        runs=cfg.runs,
        seconds=time.perf_counter() - start,
        rows_per_canary=cfg.rows_per_canary,
        canary_layout=cfg.canary_layout if cfg.rows_per_canary > 1 else "rows",
        unit="patient" if cfg.rows_per_canary > 1 and cfg.canary_layout == "patients" else "item",
        structure=cfg.structure,
    )
