"""The DP-step benchmark: one process, one model and batch, every engine side by side.

Engines: ``none`` (the floor: an ordinary step), ``dpseg``, ``opacus-hooks`` and
``opacus-functorch`` (Opacus's two per-sample modes). Each runs the same training step
(forward, loss, backward, optimizer step) on a fresh copy of the same model and the same
data; the report gives medians and ratios to ``none``. An engine that fails (Opacus on
MONAI's in-place activations, say) is reported with the first line of its error.

``run_step_benchmark`` measures dpseg's own benchmark U-Net; ``bench_step`` measures any
model on the user's example batch (``dpseg bench --model PACKAGE.MODULE:CALLABLE``).

With ``physical_batch`` the step is one logical batch of ``batch`` samples drawn from a
DataLoader in physical batches of at most ``physical_batch``: BatchMemoryManager for dpseg
and for Opacus, ordinary gradient accumulation for ``none``. Every engine then pays the
same collation, so ``--batch 4,64 --physical-batch 4`` compares a logical batch of 64 with a
plain batch of 4 on equal terms.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpseg.perf.harness import (
    Timing,
    environment,
    peak_memory_call,
    time_call,
)

ENGINES = ("none", "dpseg", "opacus-hooks", "opacus-functorch")
# dpseg with the batch's rows grouped into patients of ``rows_per_patient`` rows (averaged,
# clipped as one): against "dpseg" on the same rows it is the price of the patient unit.
GROUPED = "dpseg-grouped"


@dataclass
class StepBenchConfig:
    channels: tuple[int, ...] = (16, 32, 64)
    size: int = 64
    batch: int = 2
    device: str = "cpu"
    amp: str = "none"  # "none" | "bf16" | "fp16" autocast
    engines: tuple[str, ...] = ENGINES
    repeats: int = 5
    warmup: int = 2
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    backend: str = "auto"
    seed: int = 0
    physical_batch: int | None = None  # virtual steps: physical batches of at most this
    spatial_dims: int = 3  # 2: a 2-D U-Net on size x size slices (the demo's workload)
    upsample: str = "transpose"  # "interp": the federated runs' (Opacus has no ConvTranspose)
    rows_per_patient: int = 1  # dpseg-grouped: consecutive rows of one patient
    # A timed round runs every engine for this many seconds' worth of steps (the same whole
    # number of steps for each, from the fastest engine's last warm-up step) and records the
    # mean step; 0: one step a round. Short steps on a shared CPU jitter by 10-20% from one
    # to the next (page faults of fresh buffers, preemption), which widens a one-step round's
    # ratio without moving its median.
    round_seconds: float = 0.0


@dataclass
class EngineResult:
    engine: str
    median_s: float | None = None
    p20_s: float | None = None
    p80_s: float | None = None
    p25_s: float | None = None
    p75_s: float | None = None
    samples_s: list[float] = field(default_factory=list)  # one per interleaved round
    peak_bytes: int | None = None
    error: str | None = None
    time_ratio: float | None = None
    memory_ratio: float | None = None


@dataclass
class StepBenchReport:
    config: dict
    environment: dict
    results: list[EngineResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "environment": self.environment,
            "results": [asdict(r) for r in self.results],
        }


def make_step(
    engine: str, model, x, y, cfg: StepBenchConfig, loss_fn: Callable | None = None
) -> Callable[[], None]:
    """Builds the engine's training step around a private copy of the model (the loss
    defaults to cross-entropy over the voxels)."""
    loss_fn = loss_fn or F.cross_entropy
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    # make_private needs a loader to derive the sample rate; the plain step reuses the fixed
    # batch, the virtual one draws it from this loader (one logical batch per pass).
    virtual = cfg.physical_batch is not None
    data = TensorDataset(x, y) if virtual else TensorDataset(x.cpu(), y.cpu())
    loader = DataLoader(data, batch_size=cfg.batch)
    if engine in ("dpseg", GROUPED):
        import dpseg
        from dpseg.privacy import RowUnits

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what the epsilon is about: not the point here
            model, optimizer, loader = dpseg.PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=cfg.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=False,
                backend=cfg.backend,
            )
        if engine == GROUPED:  # the fixed batch's rows, k consecutive rows a patient
            k = cfg.rows_per_patient
            if k < 1 or x.shape[0] % k:
                raise ValueError(f"batch {x.shape[0]} is not a whole number of {k}-row patients")
            model.unit_feed.current = RowUnits((k,) * (x.shape[0] // k), "patient")
        manager = dpseg.BatchMemoryManager
    elif engine.startswith("opacus"):
        import opacus
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, loader = opacus.PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=cfg.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm,
                poisson_sampling=False,
                grad_sample_mode=engine.split("-", 1)[1],
            )
        manager = BatchMemoryManager
    elif engine == "none":
        manager = None
    else:
        raise ValueError(f"unknown engine {engine!r}; use one of {(*ENGINES, GROUPED)}")

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    def loss_of(xb, yb):
        ctx = (
            torch.autocast(xb.device.type, dtype=amp_dtype)
            if amp_dtype
            else contextlib.nullcontext()
        )
        with ctx:
            return loss_fn(model(xb), yb)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        optimizer.step()

    def virtual_step() -> None:
        if manager is None:  # the floor: ordinary accumulation over the physical batches
            optimizer.zero_grad(set_to_none=True)
            for xb, yb in DataLoader(data, batch_size=cfg.physical_batch):
                (loss_of(xb, yb) * (len(xb) / len(data))).backward()
            optimizer.step()
            return
        with manager(
            data_loader=loader, max_physical_batch_size=cfg.physical_batch, optimizer=optimizer
        ) as physical:
            for xb, yb in physical:
                optimizer.zero_grad(set_to_none=True)
                loss_of(xb, yb).backward()
                optimizer.step()

    return virtual_step if virtual else step


def build_workload(cfg: StepBenchConfig):
    """(model, x, y): the benchmark 3D U-Net (GroupNorm, 1 -> 2 classes) and one batch."""
    from dpseg.models import UNet

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    dims = cfg.spatial_dims
    model = UNet(dims, 1, 2, channels=cfg.channels, norm="group", upsample=cfg.upsample)
    model = model.to(device)
    x = torch.randn(cfg.batch, 1, *([cfg.size] * dims), device=device)
    y = torch.randint(0, 2, (cfg.batch, *([cfg.size] * dims)), device=device)
    return model, x, y


def run_step_benchmark(
    cfg: StepBenchConfig, progress: Callable[[str], None] | None = None
) -> StepBenchReport:
    """dpseg's benchmark U-Net (cfg.channels, cfg.size^3, cfg.batch) under every engine."""
    model, x, y = build_workload(cfg)
    return _run_engines(model, x, y, cfg, None, {}, progress)


def bench_step(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    example_target: torch.Tensor,
    loss_fn: Callable | None = None,
    *,
    engines: tuple[str, ...] = ENGINES,
    repeats: int = 5,
    warmup: int = 2,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    backend: str = "auto",
    physical_batch: int | None = None,
    amp: str = "none",
    round_seconds: float = 0.0,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> StepBenchReport:
    """The DP-step benchmark on the user's own network: non-private, dpseg and Opacus
    (hooks, functorch) side by side in this process, on ``example_input`` (its leading
    dimension is the batch) and ``example_target``, with ``loss_fn(output, target)``
    (default cross-entropy). The model is copied for each engine, never trained itself."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ValueError("example_input must be a batched tensor (B, C, ...)")
    if example_target.shape[0] != example_input.shape[0]:
        raise ValueError(
            f"example_target has {example_target.shape[0]} samples, example_input "
            f"{example_input.shape[0]}"
        )
    cfg = StepBenchConfig(
        size=int(example_input.shape[-1]),
        batch=int(example_input.shape[0]),
        device=str(example_input.device.type),
        amp=amp,
        engines=tuple(engines),
        repeats=repeats,
        warmup=warmup,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        backend=backend,
        physical_batch=physical_batch,
        channels=(),
        round_seconds=round_seconds,
    )
    extra = {
        "model": name or type(model).__name__,
        "input_shape": list(example_input.shape),
    }
    return _run_engines(model, example_input, example_target, cfg, loss_fn, extra, progress)


def steps_per_round(round_seconds: float, warm_step_s: list[float]) -> int:
    """Steps each engine runs in one timed round: enough for ``round_seconds`` at the fastest
    engine's warm-up pace (the same number for every engine, so a round compares equal work);
    1 without a target or a warm-up to pace it by."""
    if round_seconds <= 0 or not warm_step_s:
        return 1
    return max(1, math.ceil(round_seconds / max(min(warm_step_s), 1e-6)))


def _repeated(step: Callable[[], None], times: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            step()

    return run


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _run_engines(model, x, y, cfg, loss_fn, extra: dict, progress) -> StepBenchReport:
    device = torch.device(cfg.device)
    report = StepBenchReport(
        config={
            **asdict(cfg),
            **extra,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        environment=environment(device),
    )
    # Build and warm every engine first, then time them interleaved, the same number of
    # steps each per round (cfg.round_seconds): load on a shared machine drifts, and timing
    # engines in separate blocks would charge that drift to whichever engine ran during it.
    if cfg.round_seconds > 0 and cfg.warmup < 1:
        raise ValueError("round_seconds paces the rounds by a warm-up step: set warmup >= 1")
    steps, results, warm_s = {}, {}, {}
    for engine in cfg.engines:
        if progress:
            progress(f"{engine}: build and warm up")
        results[engine] = EngineResult(engine)
        try:
            step = make_step(engine, model, x, y, cfg, loss_fn)
            for _ in range(cfg.warmup):
                warm_s[engine] = time_call(step, repeats=1, warmup=0, device=device).median_s
            steps[engine] = step
        except torch.OutOfMemoryError:
            results[engine].error = "out of memory"
        except Exception as exc:  # a baseline that cannot run is reported, not fatal
            results[engine].error = first_line(exc)
    per_round = steps_per_round(cfg.round_seconds, [warm_s[e] for e in steps if e in warm_s])
    report.config["steps_per_round"] = per_round
    samples = {engine: [] for engine in steps}
    for round_ in range(cfg.repeats):
        if progress:
            progress(f"timing round {round_ + 1}/{cfg.repeats}")
        for engine, step in list(steps.items()):
            try:
                run = _repeated(step, per_round)
                samples[engine].append(time_call(run, 1, 0, device).median_s / per_round)
            except torch.OutOfMemoryError:
                results[engine].error = "out of memory"
                del steps[engine]
            except Exception as exc:  # failed on its first run (no warm-up asked for)
                results[engine].error = first_line(exc)
                del steps[engine]
    for engine, step in steps.items():
        if progress:
            progress(f"{engine}: peak memory")
        t = Timing.of(samples[engine])
        r = results[engine]
        r.median_s, r.p20_s, r.p80_s = t.median_s, t.p20_s, t.p80_s
        r.p25_s, r.p75_s = t.p25_s, t.p75_s
        r.samples_s = list(samples[engine])
        try:
            r.peak_bytes = peak_memory_call(step, device=device)
        except torch.OutOfMemoryError:
            r.error = "out of memory"
        except Exception as exc:
            r.error = first_line(exc)
    steps.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report.results.extend(results[e] for e in cfg.engines)
    base = next((r for r in report.results if r.engine == "none" and r.median_s), None)
    for r in report.results:
        if base and r.median_s:
            r.time_ratio = r.median_s / base.median_s
            if r.peak_bytes and base.peak_bytes:
                r.memory_ratio = r.peak_bytes / base.peak_bytes
    return report


def format_table(report: StepBenchReport) -> str:
    cfg = report.config
    if cfg.get("model"):
        what = f"{cfg['model']} ({cfg['parameters']:,} params), input {tuple(cfg['input_shape'])}"
    else:
        what = (
            f"UNet{tuple(cfg['channels'])} ({cfg['parameters']:,} params), "
            f"{cfg['size']}^{cfg.get('spatial_dims', 3)}"
        )
    lines = [
        f"DP step, {what}, batch {cfg['batch']}"
        + (f" in physical batches of {cfg['physical_batch']}" if cfg.get("physical_batch") else "")
        + f", {cfg['device']} ({report.environment['device']}), amp={cfg['amp']}"
        + (f", huge pages: {hp}" if (hp := report.environment.get("huge_pages")) else "")
        + (f", freed memory: {fm}" if (fm := report.environment.get("freed_memory")) else ""),
        f"{'engine':<18}{'median ms':>11}{'p20-p80 ms':>16}"
        f"{'peak MiB':>10}{'time x':>8}{'mem x':>7}",
    ]
    for r in report.results:
        if r.error:  # the whole first line stays in the JSON report
            error = r.error if len(r.error) <= 96 else r.error[:93] + "..."
            lines.append(f"{r.engine:<18}{error}")
            continue
        peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "n/a"
        tr = f"{r.time_ratio:.2f}" if r.time_ratio else "-"
        mr = f"{r.memory_ratio:.2f}" if r.memory_ratio else "-"
        spread = f"{r.p20_s * 1e3:.0f}-{r.p80_s * 1e3:.0f}"
        lines.append(f"{r.engine:<18}{r.median_s * 1e3:>11.0f}{spread:>16}{peak:>10}{tr:>8}{mr:>7}")
    by = {r.engine: r for r in report.results if r.samples_s}
    for engine, base in ((GROUPED, "dpseg"), ("dpseg", "none"), (GROUPED, "none")):
        if engine in by and base in by:
            q = round_ratios(by[engine].samples_s, by[base].samples_s)
            lines.append(
                f"{engine} / {base}, round by round: median {q[1]:.3f}x, "
                f"IQR {q[0]:.3f}-{q[2]:.3f}x over {len(by[engine].samples_s)} rounds"
                + (f" of {k} steps" if (k := cfg.get("steps_per_round", 1)) > 1 else "")
            )
    return "\n".join(lines)


def round_ratios(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th percentiles) of a[i] / b[i]: engines timed in the same round share
    that round's machine load, so their ratio is steadier than a ratio of medians."""
    import statistics

    ratios = [x / y for x, y in zip(a, b, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    qs = statistics.quantiles(ratios, n=4, method="inclusive")
    return qs[0], statistics.median(ratios), qs[2]
