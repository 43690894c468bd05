"""Single-site training: the pieces a federated simulator reuses, and the run that uses them.

Building blocks (each usable alone):

- `TrainConfig`: every setting of a run, a flat dataclass saved into the checkpoint.
- `build_model(cfg, num_classes)`, `build_optimizer(cfg, params)`.
- `load_cases(dataset, preprocessing, indices)`: volumes in memory, preprocessed.
- `make_loader(images, labels, cfg)`: one patch per patient per item, batched by the
  engine's Poisson sampler (`make_private`) or, without DP, by the same sampler built here.
- `privatize(cfg, model, optimizer, loader, steps)`: dpseg or Opacus engine, or none.
- `local_train(model, optimizer, loader, loss_fn, steps, device, ...)`: N optimizer steps,
  re-iterating the loader as needed; per-step losses.
- `evaluate(model, images, labels, cfg)`: per-case Dice (and HD95) by sliding window.
- `predict_volume(model, image, ...)`: logits of one whole volume (2D models slice by slice).

`run_training(cfg, resume=...)` is the `dpseg train` command on top of them.

Determinism: each step reseeds the Poisson sampler, the patch sampler and (Opacus) the noise
generator from (seed, step), and dpseg's noise is keyed by (seed, step) already; so step k's
batch and noise do not depend on how the run got to step k, and a run resumed from a
checkpoint ends on the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import dpseg
from dpseg.data import DataError, MSDDataset, PatchDataset, Preprocessing, Volume, resample_to_shape
from dpseg.models import UNet
from dpseg.privacy import DPDataLoader
from dpseg.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from dpseg.train.inference import sliding_window_inference
from dpseg.train.losses import DiceCELoss
from dpseg.train.metrics import dice_per_class, hausdorff95

__all__ = [
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "lr_at",
    "split_cases",
    "load_cases",
    "make_loader",
    "privatize",
    "reseed_step",
    "local_train",
    "evaluate",
    "predict_volume",
    "unwrap",
    "run_training",
    "device_name",
]

DEFAULT_STEPS = 200
ENGINES = ("dpseg", "opacus")


@dataclass
class TrainConfig:
    """Settings of one run. `batch` is the expected batch size: the Poisson sample rate is
    1 / ceil(cases / batch). DP is on unless `dp=False`; the noise comes from
    `noise_multiplier`, or is solved for `target_epsilon` over the planned steps, or is 1.0."""

    data: str = ""
    out: str = ""
    steps: int | None = None
    epochs: float | None = None
    patch: int = 32
    batch: int = 8
    dp: bool = True
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    engine: str = "dpseg"
    accountant: str = "prv"
    backend: str = "auto"
    device: str = "cpu"
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "constant"
    momentum: float = 0.9
    channels: tuple[int, ...] = (8, 16, 32)
    spatial_dims: int = 3
    norm: str = "group"
    upsample: str = "transpose"
    channel: int | None = None
    site: str | None = None
    spacing: tuple[float, float, float] | None = None
    val_fraction: float = 0.2
    p_foreground: float = 0.5
    overlap: float = 0.25
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 50
    epsilon_every: int = 10

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in values.items() if k in known})
        cfg.channels = tuple(int(c) for c in cfg.channels)
        if cfg.spacing is not None:
            cfg.spacing = tuple(float(s) for s in cfg.spacing)
        return cfg

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["spacing"] = list(self.spacing) if self.spacing is not None else None
        return d

    def check(self) -> None:
        """ValueError naming the setting to change."""
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        div = 2 ** (len(self.channels) - 1)
        if self.patch < div or self.patch % div:
            raise ValueError(
                f"patch {self.patch} must be a multiple of {div} for a U-Net of "
                f"{len(self.channels)} levels (channels {self.channels})"
            )
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if self.dp and self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("give either noise_multiplier or target_epsilon, not both")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")


# --- building blocks -----------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int) -> UNet:
    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=1,
        out_channels=num_classes,
        channels=cfg.channels,
        norm=cfg.norm,
        upsample=cfg.upsample,
        seed=cfg.seed,
    )


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def lr_at(cfg: TrainConfig, step: int, steps: int) -> float:
    """Learning rate of step `step` (0-based) of `steps`: constant, or a cosine from lr down
    to lr/20. A pure function of the step, so a resumed run follows the same schedule."""
    if cfg.lr_schedule == "constant" or steps <= 1:
        return cfg.lr
    floor = cfg.lr / 20
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(step, steps) / steps))


def split_cases(indices: Sequence[int], val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation) indices: a seeded shuffle, at least one validation case when
    val_fraction > 0, both lists sorted."""
    indices = list(indices)
    if val_fraction <= 0:
        return sorted(indices), []
    if len(indices) < 2:
        raise ValueError(
            f"{len(indices)} case(s) cannot be split into training and validation; add cases "
            "or set --val-fraction 0"
        )
    order = np.random.default_rng([seed, 7]).permutation(len(indices))
    n_val = min(len(indices) - 1, max(1, round(val_fraction * len(indices))))
    val = sorted(indices[i] for i in order[:n_val])
    train = sorted(indices[i] for i in order[n_val:])
    return train, val


def load_cases(
    dataset: MSDDataset,
    preprocessing: Preprocessing,
    indices: Sequence[int],
    progress: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], list[Volume]]:
    """Load and preprocess cases: (images, labels, image Volumes). The Volumes keep the
    geometry (affine, original grid) without their voxels, to spare memory."""
    images, labels, volumes = [], [], []
    for i in tqdm(indices, desc="loading", unit="case", disable=not progress, leave=False):
        image, label = dataset.load(i)
        img, lab, affine = preprocessing.apply(image, label)
        images.append(img)
        labels.append(lab)
        image.array = np.empty((0,), dtype=np.float32)
        image.affine = affine  # the grid the arrays are on (after any resampling)
        volumes.append(image)
    return images, labels, volumes


def make_loader(images, labels, cfg: TrainConfig) -> DataLoader:
    """An ordinary DataLoader over one-patch-per-patient items; `privatize` turns it into
    Poisson batches with sample rate 1 / len(loader)."""
    ds = PatchDataset(
        images,
        labels,
        (cfg.patch,) * cfg.spatial_dims,
        p_foreground=cfg.p_foreground,
        spatial_dims=cfg.spatial_dims,
        seed=cfg.seed,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(ds, batch_size=min(cfg.batch, len(ds)), generator=generator)


def total_steps(cfg: TrainConfig, loader: DataLoader) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * len(loader)))
    return DEFAULT_STEPS


@dataclass
class Privacy:
    """What `privatize` set up: the engine (None without DP) and the numbers for the report."""

    engine: Any = None
    noise_multiplier: float | None = None
    sample_rate: float = 0.0
    grad_sample_mode: str | None = None
    notes: list[str] = field(default_factory=list)

    def epsilon(self, delta: float) -> float | None:
        if self.engine is None:
            return None
        if len(self.engine.accountant.history) == 0:  # Opacus's PRV gives NaN on no steps
            return 0.0
        return float(self.engine.get_epsilon(delta=delta))

    def ledger(self) -> dict | None:
        if self.engine is None:
            return None
        if isinstance(self.engine, dpseg.PrivacyEngine):
            return self.engine.state_dict()
        acc = self.engine.accountant
        return {"accountant": acc.mechanism(), "history": [list(h) for h in acc.history]}

    def load_ledger(self, state: dict) -> None:
        if isinstance(self.engine, dpseg.PrivacyEngine):
            self.engine.load_state_dict(state)
        else:
            if state["accountant"] != self.engine.accountant.mechanism():
                raise ValueError(f"checkpoint ledger uses the {state['accountant']} accountant")
            self.engine.accountant.history = [tuple(h) for h in state["history"]]


def noise_for_epsilon(cfg: TrainConfig, sample_rate: float, steps: int) -> float:
    """Smallest sigma spending cfg.target_epsilon at cfg.delta in `steps` Poisson steps."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=cfg.target_epsilon,
                target_delta=cfg.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=cfg.accountant,
                epsilon_tolerance=0.01,
            )
        )


def privatize(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    noise_multiplier: float | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, Privacy]:
    """Wrap for DP (cfg.engine) or, with cfg.dp False, only switch the loader to the same
    Poisson sampling, so that DP and non-DP runs see the same batches. `noise_multiplier`
    overrides cfg (a resumed run keeps the sigma it started with)."""
    q = 1.0 / len(loader)
    if not cfg.dp:
        gen = torch.Generator().manual_seed(cfg.seed)
        return (
            model,
            optimizer,
            DPDataLoader.from_data_loader(loader, generator=gen),
            Privacy(sample_rate=q),
        )
    sigma = noise_multiplier
    if sigma is None:
        if cfg.target_epsilon is not None:
            sigma = noise_for_epsilon(cfg, q, steps)
        else:
            sigma = 1.0 if cfg.noise_multiplier is None else float(cfg.noise_multiplier)
    info = Privacy(noise_multiplier=sigma, sample_rate=q)
    if cfg.engine == "dpseg":
        engine = dpseg.PrivacyEngine(accountant=cfg.accountant)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, backend=cfg.backend,
            noise_seed=cfg.seed,
        )  # fmt: skip
    else:
        import opacus

        # Opacus's hooks mode has no per-sample rule for ConvTranspose3d; its functorch mode
        # (vmap over the model) covers every layer, at a memory cost.
        mode = "functorch" if cfg.upsample == "transpose" else "hooks"
        info.grad_sample_mode = mode
        info.notes.append(
            f"Opacus grad_sample_mode={mode!r} "
            + ("(ConvTranspose3d needs it)" if mode == "functorch" else "(upsample='interp')")
        )
        if mode == "functorch":
            info.notes.append(
                "Opacus functorch mode fails on an empty Poisson batch (probability (1-q)^N "
                "per step)"
            )
        engine = opacus.PrivacyEngine(accountant=cfg.accountant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, grad_sample_mode=mode,
                noise_generator=torch.Generator().manual_seed(cfg.seed),
            )  # fmt: skip
    info.engine = engine
    return model, optimizer, loader, info


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a dpseg PrivateModule or an Opacus GradSampleModule."""
    return getattr(model, "_module", model)


def _seed_of(seed: int, step: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> 1)


def reseed_step(loader: DataLoader, optimizer: torch.optim.Optimizer, seed: int, step: int) -> None:
    """Make step `step`'s batch, patches and (Opacus) noise functions of (seed, step) alone.

    Works on dpseg's and Opacus's Poisson loaders (their batch sampler draws from
    `.generator`) and on PatchDataset (its numpy generator). Anything else is left alone.
    """
    sampler_gen = getattr(loader.batch_sampler, "generator", None)
    if isinstance(sampler_gen, torch.Generator):
        sampler_gen.manual_seed(_seed_of(seed, step, 0))
    if isinstance(loader.dataset, PatchDataset):
        loader.dataset._rng = np.random.default_rng([seed, step, 1])
        loader.dataset._rng_worker = None
    noise_gen = getattr(optimizer, "generator", None)  # Opacus's DPOptimizer
    if isinstance(noise_gen, torch.Generator):
        noise_gen.manual_seed(_seed_of(seed, step, 2))


def local_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, float, int], None] | None = None,
    seed: int | None = None,
    start_step: int = 0,
    lr: Callable[[int], float] | None = None,
) -> list[float]:
    """Run `steps` optimizer steps over the loader's batches, starting a new pass over the
    loader whenever one ends; returns the loss of every step.

    With `seed`, step `start_step + i` is reseeded first (`reseed_step`), so a run is
    reproducible across interruptions. `on_step(step, loss, batch_size)` is called after
    each step with the global step number (1-based). `lr(step)`, if given, sets every
    parameter group's learning rate before the step. An empty Poisson batch still makes a
    step (under DP it is pure noise, and it is accounted); its loss is reported as NaN.
    """
    device = torch.device(device)
    model.train()
    losses: list[float] = []
    it = None
    for i in range(steps):
        step = start_step + i
        if seed is not None:
            reseed_step(loader, optimizer, seed, step)
        try:
            if it is None:
                raise StopIteration
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            if seed is not None:  # the new iterator drew from the generator: reseed again
                reseed_step(loader, optimizer, seed, step)
            x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr(step)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        value = float(loss.detach()) if len(x) else float("nan")
        losses.append(value)
        if on_step is not None:
            on_step(step + 1, value, len(x))
    return losses


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    patch: int,
    spatial_dims: int = 3,
    overlap: float = 0.25,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    softmax: bool = True,
) -> torch.Tensor:
    """Class scores (K, *image.shape) of one preprocessed 3-D volume, on the CPU. A 2-D model
    predicts the axial slices (last axis) one by one."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
        if spatial_dims == 3:
            out = sliding_window_inference(
                x, model, patch, overlap=overlap, batch_size=batch_size, softmax=softmax
            )
            return out.cpu()
        slices = [
            sliding_window_inference(
                x[..., z], model, patch, overlap=overlap, batch_size=batch_size, softmax=softmax
            ).cpu()
            for z in range(x.shape[-1])
        ]
        return torch.stack(slices, dim=-1)
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    cfg: TrainConfig,
    num_classes: int,
    spacings: Sequence[Sequence[float]] | None = None,
    names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    hd95: bool = False,
) -> list[dict[str, Any]]:
    """Per-case validation: {"case", "dice" (mean over foreground classes), "dice_per_class",
    and with hd95=True "hd95_mm" per class (None where infinite)}."""
    results = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        scores = predict_volume(model, image, cfg.patch, cfg.spatial_dims, cfg.overlap, device)
        pred = scores.argmax(0).numpy()
        per_class = dice_per_class(pred, label, num_classes)
        row: dict[str, Any] = {
            "case": names[i] if names is not None else str(i),
            "dice": float(per_class.mean()),
            "dice_per_class": [float(d) for d in per_class],
        }
        if hd95:
            spacing = spacings[i] if spacings is not None else None
            dists = [hausdorff95(pred == c, label == c, spacing) for c in range(1, num_classes)]
            row["hd95_mm"] = [float(d) if math.isfinite(d) else None for d in dists]
        results.append(row)
    return results


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu ({cpu}, {n} thread{'s' if n != 1 else ''})"


# --- the run -----------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dpseg_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(
            f"{out}: the run folder cannot be written ({exc.strerror or exc}). Choose a "
            "writable --out folder."
        ) from exc


class _RunLock:
    """RUN/.lock holding the pid of the run writing there, so two runs never interleave
    their checkpoints; a lock whose process is gone (a killed run) is taken over."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and _alive(pid):
            raise DataError(
                f"{self.path.parent}: another dpseg run (pid {pid}) is writing to this folder. "
                "Wait for it to finish, or choose another --out."
            )
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _case_indices(dataset: MSDDataset, site: str | None) -> list[int]:
    if site is None:
        return list(range(len(dataset)))
    by_site = dataset.indices_by_site()
    if site not in by_site:
        raise DataError(
            f"{dataset.json_path}: no case of site {site!r} (sites: {sorted(by_site)}). "
            "Choose one of them with --site or leave --site out."
        )
    return by_site[site]


def run_training(
    cfg: TrainConfig,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`dpseg train`: train, checkpoint, evaluate and report into cfg.out; returns the report.

    resume=True continues from cfg.out/checkpoint.pt with the settings saved there; only the
    keys in `overrides` that are allowed to change (steps, epochs, device, eval_every,
    checkpoint_every, epsilon_every) are applied on top. Raises DataError / ValueError for
    input the user can fix.
    """
    out = Path(cfg.out)
    if resume or not (out / "checkpoint.pt").exists():
        _check_out(out)
    with _RunLock(out):
        return _run(cfg, resume, overrides, progress)


def _run(cfg: TrainConfig, resume: bool, overrides: dict | None, progress: bool) -> dict:
    from dpseg.train.report import write_report

    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(ckpt["config"])
        saved.out = str(out)
        for key, value in (overrides or {}).items():
            setattr(saved, key, value)
        if overrides and ("steps" in overrides) != ("epochs" in overrides):
            if "steps" in overrides:
                saved.epochs = None
            else:
                saved.steps = None
        cfg = saved
    elif ckpt_path.exists():
        raise DataError(
            f"{ckpt_path}: this run folder already holds a checkpoint. Continue it with "
            "--resume, or choose a new --out folder; nothing was changed."
        )
    cfg.check()
    _check_out(out)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu"
        )
    device = torch.device(cfg.device)

    dataset = MSDDataset(cfg.data, channel=cfg.channel)
    indices = _case_indices(dataset, cfg.site)
    train_idx, val_idx = split_cases(indices, cfg.val_fraction, cfg.seed)
    names = [c.name for c in dataset.cases]
    split = {"train": [names[i] for i in train_idx], "val": [names[i] for i in val_idx]}
    if ckpt is not None and ckpt.get("split") != split:
        raise DataError(
            f"{cfg.data}: the cases differ from those the checkpoint {ckpt_path} was trained on "
            "(a changed dataset.json?). Resume with the same --data, or start a new run."
        )
    prep = Preprocessing(target_spacing=cfg.spacing)
    num_classes = dataset.num_classes
    tr_images, tr_labels, _ = load_cases(dataset, prep, train_idx, progress)
    va_images, va_labels, va_volumes = load_cases(dataset, prep, val_idx, progress)

    model = build_model(cfg, num_classes)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    loader = make_loader(tr_images, tr_labels, cfg)
    steps = total_steps(cfg, loader)
    sigma = ckpt["privacy"]["noise_multiplier"] if ckpt is not None and cfg.dp else None
    model, optimizer, loader, privacy = privatize(cfg, model, optimizer, loader, steps, sigma)
    history: dict[str, list] = {"loss": [], "batch": [], "epsilon": [], "dice": []}
    start, seconds = 0, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if cfg.dp:
            privacy.load_ledger(ckpt["privacy"]["ledger"])
        set_rng_state(ckpt["rng"])
        history, start, seconds = ckpt["history"], int(ckpt["step"]), float(ckpt["seconds"])
        if start >= steps:
            warnings.warn(
                f"the checkpoint is at step {start} >= {steps}; nothing to train", stacklevel=2
            )
    if cfg.dp and cfg.target_epsilon is not None and privacy.sample_rate:
        planned = noise_for_epsilon(cfg, privacy.sample_rate, steps) if ckpt is not None else None
        if planned is not None and planned > privacy.noise_multiplier * 1.001:
            privacy.notes.append(
                "resumed past the planned steps: epsilon will exceed the target "
                f"{cfg.target_epsilon}"
            )

    loss_fn = DiceCELoss()
    val_names = split["val"]
    spacings = [v.spacing for v in va_volumes]

    def validate(step: int, final: bool = False) -> list[dict]:
        rows = evaluate(
            model, va_images, va_labels, cfg, num_classes, spacings, val_names, device, hd95=final
        )
        if rows:
            history["dice"].append([step, float(np.mean([r["dice"] for r in rows]))])
        return rows

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt_path,
            {
                "config": cfg.as_dict(),
                "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
                "model_args": {
                    "spatial_dims": cfg.spatial_dims,
                    "in_channels": 1,
                    "out_channels": num_classes,
                    "channels": list(cfg.channels),
                    "norm": cfg.norm,
                    "upsample": cfg.upsample,
                },  # fmt: skip
                "preprocessing": {
                    "normalize": prep.normalize,
                    "window": list(prep.window),
                    "target_spacing": list(cfg.spacing) if cfg.spacing else None,
                },  # fmt: skip
                "optimizer": _optimizer_state(optimizer),
                "privacy": {
                    "noise_multiplier": privacy.noise_multiplier,
                    "sample_rate": privacy.sample_rate,
                    "ledger": privacy.ledger(),
                },
                "split": split,
                "step": step,
                "seconds": seconds,
                "history": history,
            },
        )

    eps = privacy.epsilon(cfg.delta) if cfg.dp else None
    bar = tqdm(
        total=steps, initial=min(start, steps), desc="training", unit="step", disable=not progress
    )
    step = start
    t0 = time.perf_counter()

    def on_step(s: int, loss: float, batch: int) -> None:
        nonlocal eps, step
        step = s
        history["loss"].append(loss)
        history["batch"].append(batch)
        if cfg.dp and (s % max(1, cfg.epsilon_every) == 0 or s == steps):
            eps = privacy.epsilon(cfg.delta)
            history["epsilon"].append([s, eps])
        post = {"loss": f"{loss:.3f}"}
        if eps is not None:
            post["eps"] = f"{eps:.2f}"
        if history["dice"]:
            post["dice"] = f"{history['dice'][-1][1]:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update()

    # Train in chunks that end at the next evaluation or checkpoint.
    marks = {steps}
    for every in (cfg.eval_every, cfg.checkpoint_every):
        if every and every > 0:
            marks.update(range(every, steps, every))
    try:
        for mark in sorted(m for m in marks if m > start):
            t = time.perf_counter()
            local_train(
                model,
                optimizer,
                loader,
                loss_fn,
                mark - step,
                device,
                on_step,
                cfg.seed,
                step,
                lr=lambda k: lr_at(cfg, k, steps),
            )
            seconds += time.perf_counter() - t
            if cfg.eval_every and mark % cfg.eval_every == 0 and mark != steps and va_images:
                validate(mark)
            if mark == steps or (cfg.checkpoint_every and mark % cfg.checkpoint_every == 0):
                checkpoint(mark)
    finally:
        bar.close()
    rows = validate(step, final=True) if va_images else []
    if rows:
        checkpoint(step)  # again, with the final Dice in its history
    wall = time.perf_counter() - t0
    report = {
        "dice": float(np.mean([r["dice"] for r in rows])) if rows else None,
        "epsilon": privacy.epsilon(cfg.delta) if cfg.dp else None,
        "delta": cfg.delta if cfg.dp else None,
        "steps": step,
        "seconds": seconds,
        "minutes": seconds / 60.0,
        "wall_seconds_this_session": wall,
        "device": device_name(device),
        "dp": cfg.dp,
        "engine": cfg.engine if cfg.dp else "none",
        "noise_multiplier": privacy.noise_multiplier,
        "max_grad_norm": cfg.max_grad_norm if cfg.dp else None,
        "sample_rate": privacy.sample_rate,
        "expected_batch": privacy.sample_rate * len(train_idx),
        "accountant": cfg.accountant if cfg.dp else None,
        "grad_sample_mode": privacy.grad_sample_mode,
        "notes": privacy.notes,
        "train_cases": len(train_idx),
        "val_cases": len(val_idx),
        "num_classes": num_classes,
        "parameters": sum(p.numel() for p in unwrap(model).parameters()),
        "resumed_from_step": start if ckpt is not None else None,
        "per_case": rows,
        "config": cfg.as_dict(),
        "versions": {"dpseg": dpseg.__version__, "torch": torch.__version__},
        "history": history,
    }
    write_report(out, report)
    return report


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    # dpseg's DPOptimizer adds its noise counter and seed; Opacus's keeps only the wrapped
    # optimizer's state (its noise generator is reseeded per step, see reseed_step).
    return optimizer.state_dict()


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(plain model in eval mode, TrainConfig, checkpoint dict) from RUN/checkpoint.pt."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    cfg = TrainConfig.from_dict(ckpt["config"])
    args = dict(ckpt["model_args"])
    model = UNet(**{**args, "channels": tuple(args["channels"])})
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


def predict_file(
    checkpoint: str | Path,
    image: str | Path,
    out: str | Path,
    device: str | torch.device = "cpu",
    overlap: float | None = None,
    channel: int | None = None,
    progress: bool = False,
) -> Path:
    """Segment one NIfTI image and write the mask on the image's own shape and affine.

    The image gets the run's preprocessing (canonical orientation, intensity window and, if
    the run resampled, its voxel spacing); the class probabilities are resampled back to the
    canonical grid (linear) before the argmax, and `save_like` undoes the reorientation.
    """
    from dpseg.data import load_nifti, save_like

    model, cfg, ckpt = load_trained_model(checkpoint, device)
    out = Path(out)
    _check_out(out.parent)
    volume = load_nifti(image, channel=cfg.channel if channel is None else channel)
    pp = ckpt["preprocessing"]
    spacing = tuple(pp["target_spacing"]) if pp.get("target_spacing") else None
    prep = Preprocessing(
        normalize=pp["normalize"], window=tuple(pp["window"]), target_spacing=spacing
    )
    img, _, _ = prep.apply(volume)
    scores = predict_volume(
        model, img, cfg.patch, cfg.spatial_dims, cfg.overlap if overlap is None else overlap, device
    )
    if tuple(scores.shape[1:]) != volume.shape:
        scores = torch.from_numpy(
            np.stack([resample_to_shape(s.numpy(), volume.shape, order=1) for s in scores])
        )
    mask = scores.argmax(0).numpy().astype(np.uint8)
    return save_like(mask, volume, out)
