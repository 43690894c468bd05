"""A federated run of the segmentation workload, for one engine or several side by side.

With several engines (``--compare dpseg,opacus,none``) every engine gets its own simulator
built from the same volumes, seeds, model initialisation and noise multipliers, and the
rounds are *interleaved* (round 1 of each engine, then round 2 of each, ...), so a change of
machine load during the run (other jobs on a shared CPU) falls on all engines alike rather
than on whichever ran last. Each engine checkpoints to RUN/checkpoint_<engine>.pt after each
of its rounds, and RUN/report.json is rewritten after every round.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from dpseg.federated.partition import PARTITIONS
from dpseg.federated.report import build_report, summary_lines, write_report
from dpseg.federated.simulator import Simulator
from dpseg.federated.site import ENGINES, Site, SiteConfig, poisson_rate
from dpseg.federated.sitedata import SiteData, evaluate_dice, load_sites, phantom_sites
from dpseg.federated.strategies import STRATEGIES, make_strategy
from dpseg.privacy.secret import derive_seed, new_secret, resumed_secret, site_secret
from dpseg.train.checkpoint import load_checkpoint
from dpseg.train.config import LR_SCHEDULES

__all__ = [
    "FederatedConfig",
    "SetupError",
    "build_simulator",
    "noise_multipliers",
    "run_federation",
]


@dataclass
class FederatedConfig:
    # data: an MSD folder, or phantoms generated into RUN/phantoms
    data: str | None = None
    phantoms: int | None = None
    sites: int | None = None
    partition: str = "site"
    alpha: float = 0.5
    test_fraction: float = 0.25
    size: int = 32
    split: str | None = None  # FILE[:KEY]: only these cases (dpseg.train.splits)
    normalize: str = "auto"  # dpseg.train.config.NORMALIZE: percentiles for MR, window for CT
    # model and patches
    spatial_dims: int = 3  # 2: a 2-D U-Net on one axial slice per patient per draw
    channels: tuple[int, ...] = (8, 16, 32)
    norm: str = "group"
    upsample: str = "interp"
    patch: int = 32
    p_foreground: float = 0.5
    # federation
    rounds: int = 5
    local_steps: int | None = 4
    local_epochs: int | None = None
    fraction: float = 1.0
    strategy: str = "fedavg"
    mu: float = 0.01
    server_lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    # local training
    optimizer: str = "adam"
    lr: float = 3e-3
    dp_lr: float | None = None  # the DP engines' own learning rate (default: lr)
    # "cosine": round r of R trains at lr * cosine_scale(r - 1, R), from lr at round 1 down
    # towards lr/20 (reached as the last round ends); DP's noisy steps need it to settle,
    # and it is post-processing, so free in privacy.
    lr_schedule: str = "constant"
    batch_size: int = 4
    sample_rate: float | None = None  # declared q (add/remove); None: from each site's size
    items_per_patient: int = 1
    # privacy
    privacy_unit: str = "patient"  # what the ledgers call each case ("case": see dpseg train)
    engines: tuple[str, ...] = ("dpseg",)
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_epsilon: float | None = None
    accountant: str = "prv"
    opacus_mode: str = "hooks"
    backend: str = "auto"
    client_clip: float | None = None
    client_noise: float = 1.0
    # What the server accepts (dpseg/federated/update_checks.py): an update whose L2 norm
    # passes this is refused for its round; under SecAgg+, the bound the sum is held to.
    max_update_norm: float | None = None
    # Flower's SecAgg+ (--runtime flower only): the server learns only the sum of the
    # updates. Each site's weighted update is quantised to secagg_bits bits over
    # [-secagg_clip_range, secagg_clip_range]; a site whose update does not fit refuses to
    # send it rather than clip it.
    secagg: bool = False
    secagg_clip_range: float = 1.0
    secagg_bits: int = 22
    # Sites also send figures computed from their patients without DP noise (training loss,
    # held-out Dice, case counts, timings); the report marks them outside epsilon. Case
    # names never leave a site.
    share_site_stats: bool = False
    # where
    device: str = "cpu"
    seed: int = 0
    # fixes the federation's secret (dpseg.privacy.secret), which keys every site's Poisson
    # draws and noise and the server's sampling: for tests and reproductions only (the
    # randomness is then as public as this number). Default: OS entropy, in OUT/secret.key.
    secret_seed: int | None = None
    eval_overlap: float = 0.25
    eval_every: int = 1  # evaluate the global model every N rounds, and after the last
    train_sites: tuple[str, ...] = ()  # only these sites train (all are scored); () = all
    # Fewer rounds for some engines ({"opacus": 2}): their time per round is measured, their
    # Dice is not comparable and is not reported as final.
    engine_rounds: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def rounds_for(self, engine: str) -> int:
        return min(self.rounds, int(self.engine_rounds.get(engine, self.rounds)))

    def lr_for(self, engine: str) -> float:
        """DP-SGD's noisy gradients want another step size than clean ones (the single-site
        result: Adam at 3e-2 under DP, 3e-3 without), so --compare can give each its own."""
        return self.dp_lr if engine != "none" and self.dp_lr is not None else self.lr

    def check(self) -> None:
        """ValueError with the flag to change, for anything the run cannot start with."""
        if (self.data is None) == (self.phantoms is None):
            raise ValueError("give exactly one of --data DIR and --phantoms N")
        from dpseg.privacy.sampling_plan import check_unit_name

        check_unit_name(self.privacy_unit)
        if self.partition not in PARTITIONS:
            raise ValueError(f"--partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.phantoms is not None:
            if self.sites is None or self.sites < 1:
                raise ValueError("--phantoms N needs --sites K (the number of scanners)")
            per_site = self.phantoms // self.sites
            if per_site < 2:
                raise ValueError(
                    f"--phantoms {self.phantoms} over {self.sites} sites leaves {per_site} "
                    "case(s) a site; each site needs at least 2 (one to train, one held out)"
                )
        from dpseg.train.config import NORMALIZE

        if self.normalize not in NORMALIZE:
            raise ValueError(f"--normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.split and self.data is None:
            raise ValueError("--split lists cases of --data; it does not apply to --phantoms")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"--spatial-dims must be 2 or 3, got {self.spatial_dims}")
        for name, value in (("--lr", self.lr), ("--dp-lr", self.dp_lr)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        bad = [e for e in self.engines if e not in ENGINES]
        if bad or not self.engines or len(set(self.engines)) != len(self.engines):
            raise ValueError(f"engines must be distinct names from {ENGINES}, got {self.engines}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("give exactly one of --local-steps and --local-epochs")
        if (self.local_steps or 1) < 1 or (self.local_epochs or 1) < 1:
            raise ValueError("--local-steps / --local-epochs must be >= 1")
        bad_rounds = {e: n for e, n in self.engine_rounds.items() if e not in self.engines or n < 1}
        if bad_rounds:
            raise ValueError(
                f"engine rounds {bad_rounds}: name engines of this run, with >= 1 round each"
            )
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        divisor = 2 ** (len(self.channels) - 1)
        if self.patch % divisor:
            raise ValueError(
                f"--patch {self.patch} must be divisible by {divisor} for a U-Net with "
                f"{len(self.channels)} levels"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"--target-epsilon must be > 0, got {self.target_epsilon}")
        if self.target_epsilon is None and not self.noise_multiplier >= 0:
            raise ValueError(f"--noise-multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {self.delta}")
        if self.client_clip is not None and not self.client_clip > 0:
            raise ValueError(f"--client-clip must be > 0, got {self.client_clip}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"--max-update-norm must be > 0, got {self.max_update_norm}")
        if not self.secagg_clip_range > 0:
            raise ValueError(f"--secagg-clip-range must be > 0, got {self.secagg_clip_range}")
        if not 8 <= self.secagg_bits <= 30:
            raise ValueError(f"--secagg-bits must be in [8, 30], got {self.secagg_bits}")
        if self.secagg and self.client_clip is not None:
            raise ValueError(
                "--secagg with --client-clip: client-level DP clips each site's update at the "
                "server, and under SecAgg+ the server never sees a site's update, only the "
                "sum. Drop --client-clip (each site's per-patient DP still holds), or drop "
                "--secagg"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"--lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")

    def check_secagg(self, num_sites: int) -> None:
        """ValueError where SecAgg+ cannot protect the sites' updates as asked."""
        if not self.secagg:
            return
        per_round = min(num_sites, max(1, round(self.fraction * num_sites)))
        if per_round < 3:
            raise ValueError(
                f"--secagg with {per_round} site(s) a round: with two, each site learns the "
                "other's update from the sum (and SecAgg+ needs at least two). Use at least 3 "
                "sites a round (--sites, --fraction)"
            )
        # The masked sum is taken modulo 2^32: num_sites values below 2^bits must not wrap.
        if num_sites * 2**self.secagg_bits >= 2**32:
            raise ValueError(
                f"--secagg-bits {self.secagg_bits} with {num_sites} sites: their sum would "
                "wrap around 2^32; lower --secagg-bits to "
                f"{((2**32 - 1) // num_sites).bit_length() - 1} or less"
            )

    def resume_key(self) -> dict:
        """What must match for --resume (everything but the number of rounds and engines;
        with a learning-rate schedule over the rounds, their number too)."""
        d = asdict(self)
        for k in ("engines", "engine_rounds", "extra", "secret_seed"):
            d.pop(k)
        if self.lr_schedule == "constant":
            d.pop("rounds")
        d["channels"] = list(d["channels"])
        d["train_sites"] = list(d["train_sites"])
        return d

    def check_resume(self, theirs: dict, source: Path) -> None:
        """SetupError naming each setting of the checkpoint at ``source`` that differs."""
        diff = self.resume_diff(theirs)
        if diff:
            ours = self.resume_key()
            raise SetupError(
                f"{source} was written with different settings "
                f"({', '.join(f'{k}: {theirs.get(k)!r} -> {ours[k]!r}' for k in diff)}); "
                "resume with the original flags (only --rounds may grow, and not under "
                "--lr-schedule cosine, whose rounds are its length)"
            )

    def resume_diff(self, theirs: dict) -> list[str]:
        """The settings of a checkpoint (its resume_key) that differ from ours; a setting the
        checkpoint predates counts as its default."""
        defaults = {f.name: f.default for f in fields(self)}
        ours = self.resume_key()
        if "rounds" not in theirs:  # written before rounds were part of the key
            ours.pop("rounds", None)
        return sorted(k for k in ours if theirs.get(k, defaults.get(k)) != ours[k])

    @classmethod
    def from_dict(cls, d: dict) -> FederatedConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("channels", "engines", "train_sites"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _steps(cfg: FederatedConfig, n: int) -> int:
    q, per_epoch = poisson_rate(n, cfg.batch_size, cfg.sample_rate)
    return cfg.local_steps if cfg.local_steps is not None else cfg.local_epochs * per_epoch


def noise_multipliers(cfg: FederatedConfig, sites: list[SiteData]) -> dict[str, float]:
    """sigma per site: --noise-multiplier, or calibrated so that a site that takes part in
    every round ends at exactly --target-epsilon (so no site can end above it)."""
    if cfg.target_epsilon is None:
        return {s.name: float(cfg.noise_multiplier) for s in sites}
    from dpseg.train.loop import noise_for_epsilon  # reads target_epsilon, delta, accountant

    out = {}
    for s in sites:
        q, _ = poisson_rate(len(s.train_images), cfg.batch_size, cfg.sample_rate)
        out[s.name] = noise_for_epsilon(cfg, q, cfg.rounds * _steps(cfg, len(s.train_images)))
    return out


def server_strategy(cfg: FederatedConfig):
    """(strategy, client-level DP settings or None): the server side of a run, shared by the
    in-process simulator and the Flower ServerApp."""
    strategy = make_strategy(
        cfg.strategy, mu=cfg.mu, server_lr=cfg.server_lr, beta1=cfg.beta1, beta2=cfg.beta2,
        tau=cfg.tau,
    )  # fmt: skip
    client_dp = None
    if cfg.client_clip is not None:
        client_dp = {
            "clip": cfg.client_clip, "noise_multiplier": cfg.client_noise, "delta": cfg.delta,
            "accountant": "rdp",
        }  # fmt: skip
    return strategy, client_dp


def round_lr_schedule(cfg: FederatedConfig):
    """round (1-based) -> factor on the sites' learning rate, or None for a constant one.
    Shared by the simulator and the Flower ServerApp, which sends it with each round."""
    if cfg.lr_schedule == "constant":
        return None
    from dpseg.train.loop import cosine_scale

    rounds = cfg.rounds
    return lambda r: cosine_scale(r - 1, rounds)


def site_config(cfg: FederatedConfig, engine: str) -> SiteConfig:
    """A site's local training settings: the same on the simulator and on Flower."""
    return SiteConfig(
        engine=engine, optimizer=cfg.optimizer, lr=cfg.lr_for(engine), batch_size=cfg.batch_size,
        sample_rate=cfg.sample_rate, items_per_patient=cfg.items_per_patient,
        privacy_unit=cfg.privacy_unit, max_grad_norm=cfg.max_grad_norm,
        accountant=cfg.accountant, delta=cfg.delta,
        max_epsilon=cfg.max_epsilon, opacus_mode=cfg.opacus_mode, backend=cfg.backend,
        device=cfg.device,
    )  # fmt: skip


def site_patches(cfg: FederatedConfig, data: SiteData, index: int):
    """Site ``index``'s training items: its patients, k patches each (same seeds everywhere)."""
    return data.patches(
        cfg.patch, cfg.p_foreground, derive_seed(cfg.seed, 5, index), cfg.spatial_dims,
        cfg.items_per_patient,
    )  # fmt: skip


def build_simulator(
    cfg: FederatedConfig,
    engine: str,
    sites: list[SiteData],
    num_classes: int,
    sigmas: dict[str, float],
    secret: int | None = None,
) -> Simulator:
    """The in-process federation of ``engine``. ``secret``: the federation's (every engine
    of a run gets the same, so that they draw the same batches and compare like for like);
    None draws fresh ones."""
    from dpseg.models import UNet

    def model_fn():
        return UNet(
            cfg.spatial_dims, 1, num_classes, channels=cfg.channels, norm=cfg.norm,
            upsample=cfg.upsample, seed=cfg.seed,
        )  # fmt: skip

    site_cfg = site_config(cfg, engine)
    members = [
        Site(
            s.name,
            k,
            site_patches(cfg, s, k),
            model_fn,
            site_cfg,
            noise_multiplier=sigmas[s.name],
            seed=cfg.seed,
            secret=None if secret is None else site_secret(secret, k),
        )  # fmt: skip
        for k, s in enumerate(sites)
    ]
    model = model_fn().to(cfg.device)
    strategy, client_dp = server_strategy(cfg)

    def evaluate(m):
        return evaluate_dice(
            m, sites, cfg.patch, num_classes, cfg.eval_overlap, cfg.device, cfg.spatial_dims
        )

    if engine in cfg.engine_rounds:  # run for its time per round: its Dice is never final
        evaluate = None

    sim = Simulator(
        members, model, strategy, local_steps=cfg.local_steps, local_epochs=cfg.local_epochs,
        fraction=cfg.fraction, seed=cfg.seed, secret=secret, evaluate=evaluate, client_dp=client_dp,
        label=engine, train_sites=tuple(cfg.train_sites), lr_schedule=round_lr_schedule(cfg),
        max_update_norm=cfg.max_update_norm,
    )  # fmt: skip
    if evaluate is not None and cfg.eval_every > 1:

        def sometimes(m):  # sim.round is the last finished round while this one is evaluated
            r = sim.round + 1
            return evaluate(m) if r % cfg.eval_every == 0 or r >= cfg.rounds else {}

        sim.evaluate_fn = sometimes
    return sim


def load_data(cfg: FederatedConfig, out: Path, progress: bool) -> tuple[list[SiteData], int]:
    if cfg.phantoms is not None:
        return phantom_sites(
            out / "phantoms", cfg.phantoms, cfg.sites, size=cfg.size, seed=cfg.seed,
            test_fraction=cfg.test_fraction, progress=progress,
        )  # fmt: skip
    return load_sites(
        cfg.data, partition=cfg.partition, sites=cfg.sites, alpha=cfg.alpha,
        test_fraction=cfg.test_fraction, seed=cfg.seed, split=cfg.split, normalize=cfg.normalize,
    )  # fmt: skip


class SetupError(ValueError):
    """A run that cannot start as asked (bad split, resume mismatch, unsupported model):
    the message says which flag to change. The CLI prints it without a traceback."""


def run_federation(
    cfg: FederatedConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Runs (or resumes) every engine of ``cfg`` to ``cfg.rounds``; returns report.json's dict."""
    cfg.check()
    if cfg.secagg:
        raise SetupError(
            "--secagg needs --runtime flower: in one process there is no coordinator to hide "
            "the sites' updates from"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = {e: out / f"checkpoint_{e}.pt" for e in cfg.engines}
    existing = [p for p in checkpoints.values() if p.exists()]
    if existing and not resume:
        raise SetupError(
            f"{out} already holds a run ({existing[0].name}); pass --resume to continue it "
            "or choose a new --out"
        )
    others = sorted(p.name for p in out.glob("checkpoint_*.pt") if p not in existing)
    if others and not existing:  # a fresh run would replace their secret (below)
        raise SetupError(
            f"{out} holds another run ({', '.join(others)}), whose resume needs its "
            "secret.key: choose a new --out"
        )
    # The run's secret (OUT/secret.key, owner-only): a resumed run needs it to replay the
    # batches and noise it would have drawn; checkpoints never hold it.
    secret = (resumed_secret if existing else new_secret)(out, cfg.secret_seed)
    try:
        sites, num_classes = load_data(cfg, out, progress)
        sigmas = noise_multipliers(cfg, sites)
        sims = {e: build_simulator(cfg, e, sites, num_classes, sigmas, secret) for e in cfg.engines}
    except SetupError:
        raise
    except ValueError as exc:  # DataError is not a ValueError and passes through
        raise SetupError(str(exc)) from exc
    for engine, sim in sims.items():
        if resume and checkpoints[engine].exists():
            saved = load_checkpoint(checkpoints[engine])
            cfg.check_resume(saved.get("extra", {}).get("config", {}), checkpoints[engine])
            sim.load_state_dict(saved)
            echo(f"{engine}: resumed after round {sim.round} from {checkpoints[engine].name}")

    env = run_environment(cfg.device)

    def report() -> dict:
        return build_report(cfg, sims, sites, sigmas, env)

    for r in range(1, cfg.rounds + 1):
        for engine, sim in sims.items():
            if sim.round >= r or sim.done or r > cfg.rounds_for(engine):
                continue
            record = sim.run_round(progress)
            sim.save(checkpoints[engine], extra={"config": cfg.resume_key()})
            echo(round_line(engine, record, cfg.rounds_for(engine)))
        (out / "report.json").write_text(json.dumps(report(), indent=1))
    for engine, sim in sims.items():
        if sim.done:
            echo(
                f"{engine}: every site has spent its privacy budget; "
                f"stopped after round {sim.round}"
            )
    final = report()
    write_report(final, out, plots=plots)
    for line in summary_lines(final):
        echo(line)
    echo(f"wrote {out / 'report.json'}, {out / 'report.md'} and plots")
    return final


def round_line(engine: str, record: dict, rounds: int) -> str:
    parts = []
    for name, e in record["sites"].items():
        eps = e.get("epsilon")
        tag = {"ok": "", "idle": " idle", "budget": " budget spent", "failed": " FAILED",
               "refused": " REFUSED"}  # fmt: skip
        d = e.get("dice")
        parts.append(f"{name} dice {d:.3f}" if d is not None else f"{name} dice -")
        parts[-1] += (f" eps {eps:.2f}" if eps is not None else "") + tag[e["status"]]
    pooled = record.get("pooled_dice")
    pooled_s = f"{pooled:.3f}" if pooled is not None else "-"
    refused = " | ROUND REFUSED, model kept" if record.get("refused_round") else ""
    return (
        f"[{engine:>6}] round {record['round']}/{rounds}: {record['seconds']:.1f} s, "
        f"pooled dice {pooled_s} | " + "; ".join(parts) + refused
    )


def run_environment(device: str) -> dict:
    import os

    from dpseg.perf.harness import environment

    env = environment(device)
    try:
        env["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return env
