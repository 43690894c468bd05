"""Single-site training: the pieces a federated simulator reuses, and the run that uses them.

Building blocks (each usable alone):

- `TrainConfig` (dpseg.train.config): every setting of a run, saved into the checkpoint.
- `build_model(cfg, num_classes)`, `build_optimizer(cfg, params)`.
- `load_cases(dataset, preprocessing, indices)`: volumes in memory, preprocessed.
- `make_loader(images, labels, cfg)`: one patch per patient per item, batched by the
  engine's Poisson sampler (`make_private`) or, without DP, by the same sampler built here.
- `privatize(cfg, model, optimizer, loader, steps, rng_seed=...)`: dpseg or Opacus engine, or none.
- `local_train(model, optimizer, loader, loss_fn, steps, device, ...)`: N optimizer steps,
  re-iterating the loader as needed; per-step losses.
- `evaluate(model, images, labels, cfg)`: per-case Dice (and HD95) by sliding window.
- `predict_volume(model, image, ...)`: logits of one whole volume (2D models slice by slice).

`run_training(cfg, resume=...)` (dpseg.train.run) is the `dpseg train` command on top of
them; `predict_file` (dpseg.train.predict) is `dpseg predict`.

Determinism: each step reseeds the Poisson sampler, the patch sampler and (Opacus) the noise
generator from (seed, step), and dpseg's noise is keyed by (seed, step) already; so step k's
batch and noise do not depend on how the run got to step k, and a run resumed from a
checkpoint ends on the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import dpseg
from dpseg.data import MSDDataset, PatchDataset, Preprocessing, Volume, flatten_collate
from dpseg.models import UNet
from dpseg.privacy import DPDataLoader
from dpseg.privacy.accountants import accountant_for
from dpseg.privacy.accountants import noise_for_epsilon as noise_for
from dpseg.train.config import DEFAULT_STEPS, TrainConfig
from dpseg.train.inference import sliding_window_inference
from dpseg.train.metrics import dice_per_class, hausdorff95
from dpseg.train.postprocess import keep_largest_component


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


def cosine_scale(step: int, steps: int, floor: float = 1 / 20) -> float:
    """The factor on the learning rate at step `step` (0-based) of `steps`: a cosine from 1
    down to `floor`. A pure function of the step, so a resumed run follows the same schedule."""
    if steps <= 1:
        return 1.0
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * min(step, steps) / steps))


def lr_at(cfg: TrainConfig, step: int, steps: int) -> float:
    """Learning rate of step `step` (0-based) of `steps`: constant, or a cosine from lr down
    to lr/20."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * cosine_scale(step, steps)


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
    for i in tqdm(
        indices, desc="loading", unit="case", disable=None if progress else True, leave=False
    ):
        image, label = dataset.load(i)
        img, lab, affine = preprocessing.apply(image, label)
        images.append(img)
        labels.append(lab)
        image.array = np.empty((0,), dtype=np.float32)
        image.affine = affine  # the grid the arrays are on (after any resampling)
        volumes.append(image)
    return images, labels, volumes


def make_loader(images, labels, cfg: TrainConfig) -> DataLoader:
    """An ordinary DataLoader whose items are patients (cfg.items_per_patient patches each);
    `privatize` turns it into Poisson batches of patients."""
    ds = PatchDataset(
        images,
        labels,
        (cfg.patch,) * cfg.spatial_dims,
        p_foreground=cfg.p_foreground,
        spatial_dims=cfg.spatial_dims,
        seed=cfg.seed,
        samples_per_item=cfg.items_per_patient,
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    collate = flatten_collate if cfg.items_per_patient > 1 else None
    return DataLoader(
        ds, batch_size=min(cfg.batch, len(ds)), generator=generator, collate_fn=collate
    )


def sampling_of(cfg: TrainConfig, loader: DataLoader) -> tuple[float, int]:
    """(q, steps a pass): the declared rate and round(1/q), or Opacus's convention from the
    number of cases (1 / len(loader), len(loader))."""
    if cfg.sample_rate is not None:
        return cfg.sample_rate, max(1, int(round(1 / cfg.sample_rate)))
    return 1.0 / len(loader), len(loader)


def total_steps(cfg: TrainConfig, loader: DataLoader) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * sampling_of(cfg, loader)[1]))
    return DEFAULT_STEPS


@dataclass
class Privacy:
    """What `privatize` set up: the engine (None without DP) and the numbers for the report."""

    engine: Any = None
    noise_multiplier: float | None = None
    sample_rate: float = 0.0
    grad_sample_mode: str | None = None
    notes: list[str] = field(default_factory=list)
    unit: str = "item"  # what Opacus's rows are: one patch of one case each (no k > 1)

    def epsilon(self, delta: float) -> float | None:
        if self.engine is None:
            return None
        if len(self.engine.accountant.history) == 0:  # Opacus's PRV gives NaN on no steps
            return 0.0
        return float(self.engine.get_epsilon(delta=delta))

    def ledger(self) -> dict | None:
        """The accountant's history and what the epsilon is about (unit, adjacency)."""
        if self.engine is None:
            return None
        if isinstance(self.engine, dpseg.PrivacyEngine):
            return self.engine.state_dict()
        acc = self.engine.accountant
        # Opacus: rows, q from len(loader) (the number of cases is public: replace-one, but
        # Opacus reports add/remove; said in the report's notes).
        return {
            "accountant": acc.mechanism(),
            "history": [list(h) for h in acc.history],
            "unit": self.unit,
            "adjacency": "add/remove (Opacus's claim; q was derived from N)",
            "sampling": "poisson",
        }

    def guarantee(self) -> dict:
        """{"unit", "adjacency", "sampling"} of the epsilon (all None without DP)."""
        ledger = self.ledger() or {}
        return {k: ledger.get(k) for k in ("unit", "adjacency", "sampling")}

    def load_ledger(self, state: dict) -> None:
        if isinstance(self.engine, dpseg.PrivacyEngine):
            self.engine.load_state_dict(state)
        else:
            if state["accountant"] != self.engine.accountant.mechanism():
                raise ValueError(f"checkpoint ledger uses the {state['accountant']} accountant")
            self.engine.accountant.history = [tuple(h) for h in state["history"]]


def adjacency_of(cfg) -> str:
    """add/remove when q and the normaliser are declared constants, else replace-one."""
    return "add/remove" if getattr(cfg, "sample_rate", None) is not None else "replace-one"


def noise_for_epsilon(cfg, sample_rate: float, steps: int) -> float:
    """Smallest sigma spending cfg.target_epsilon at cfg.delta in `steps` Poisson steps,
    under the accountant that will report dpseg's run (dpseg.privacy.accountants). ``cfg``:
    a TrainConfig, or any config with target_epsilon, delta, accountant and sample_rate."""
    accountant = cfg.accountant
    if getattr(cfg, "engine", "dpseg") == "dpseg":
        accountant = accountant_for(cfg.accountant, adjacency_of(cfg), "poisson")
    return noise_for(cfg.target_epsilon, cfg.delta, sample_rate, steps, accountant)


def privatize(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    noise_multiplier: float | None = None,
    *,
    rng_seed: int,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, Privacy]:
    """Wrap for DP (cfg.engine) or, with cfg.dp False, only switch the loader to the same
    Poisson sampling. `noise_multiplier` overrides cfg (a resumed run keeps the sigma it
    started with). `rng_seed` keys the Poisson draws and the noise: the run's --seed mixed
    with its secret (dpseg.privacy.secret), never the public seed alone."""
    q = sampling_of(cfg, loader)[0]
    if not cfg.dp:
        from torch.nn.parallel import DistributedDataParallel

        gen = torch.Generator().manual_seed(rng_seed)
        shard = None
        if isinstance(model, DistributedDataParallel):  # the same split as the DP engine's
            shard = (torch.distributed.get_rank(), torch.distributed.get_world_size())
        plain = DPDataLoader.from_data_loader(
            loader, generator=gen, distributed=shard, sample_rate=cfg.sample_rate
        )
        return model, optimizer, plain, Privacy(sample_rate=q)
    sigma = noise_multiplier
    if sigma is None:
        if cfg.target_epsilon is not None:
            sigma = noise_for_epsilon(cfg, q, steps)
        else:
            sigma = 1.0 if cfg.noise_multiplier is None else float(cfg.noise_multiplier)
    info = Privacy(noise_multiplier=sigma, sample_rate=q, unit=cfg.privacy_unit)
    if cfg.engine == "dpseg":
        engine = dpseg.PrivacyEngine(accountant=cfg.accountant)
        declared = {}
        if cfg.sample_rate is not None:  # public constants: add/remove adjacency
            declared = {"sample_rate": cfg.sample_rate, "expected_batch_size": cfg.batch}
        with warnings.catch_warnings():
            # What the epsilon is about is in the report; dpseg's DiceCELoss is a mean of
            # per-sample terms, so no unit's gradient depends on another's.
            warnings.simplefilter("ignore", UserWarning)
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, backend=cfg.backend,
                noise_seed=rng_seed, privacy_unit=cfg.privacy_unit, **declared,
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
        if cfg.sample_rate is not None:
            raise ValueError(
                "engine 'opacus' derives q from the number of cases (1 / len(loader)); drop "
                "sample_rate, or use engine 'dpseg'"
            )
        engine = opacus.PrivacyEngine(accountant=cfg.accountant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, grad_sample_mode=mode,
                noise_generator=torch.Generator().manual_seed(rng_seed),
            )  # fmt: skip
    info.engine = engine
    return model, optimizer, loader, info


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a dpseg PrivateModule or an Opacus GradSampleModule, and
    inside DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_module", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def _seed_of(seed: int, step: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> 1)


def reseed_step(loader: DataLoader, optimizer: torch.optim.Optimizer, seed: int, step: int) -> None:
    """Make step `step`'s batch, patches and (Opacus) noise functions of (seed, step) alone.

    Works on dpseg's and Opacus's Poisson loaders (their batch sampler draws from
    `.generator`), on a shuffled DataLoader given a generator (its RandomSampler draws the
    pass's order at the pass's first step) and on PatchDataset (its numpy generator).
    Anything else is left alone.
    """
    sampler_gen = getattr(loader.batch_sampler, "generator", None)
    if not isinstance(sampler_gen, torch.Generator):  # a shuffled pass: its RandomSampler's
        sampler_gen = getattr(loader.sampler, "generator", None)
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


SLICE_BATCH = 64  # slices a forward when a 2-D model predicts a volume slice by slice


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
        if tuple(x.shape[1:3]) == (patch, patch):
            # One window is the whole slice (its weight cancels): the slices in batches, one
            # forward for SLICE_BATCH slices instead of one each (a 1800-case 2-D federated
            # run spent 11 of its 12 minutes in per-slice calls).
            stack = x[0].permute(2, 0, 1).unsqueeze(1)  # (Z, 1, H, W)
            out = torch.cat([model(chunk) for chunk in stack.split(SLICE_BATCH)]).float()
            if softmax:
                out = out.softmax(1)
            return out.permute(1, 2, 3, 0).cpu()  # (K, H, W, Z)
        slices = [
            sliding_window_inference(
                x[..., z], model, patch, overlap=overlap, batch_size=batch_size, softmax=softmax
            ).cpu()
            for z in range(x.shape[-1])
        ]
        return torch.stack(slices, dim=-1)
    finally:
        model.train(was_training)


def _scores(
    pred: np.ndarray,
    label: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] | None,
    hd95: bool,
) -> dict[str, Any]:
    per_class = dice_per_class(pred, label, num_classes)
    row: dict[str, Any] = {
        "dice": float(per_class.mean()),
        "dice_per_class": [float(d) for d in per_class],
    }
    if hd95:
        dists = [hausdorff95(pred == c, label == c, spacing) for c in range(1, num_classes)]
        row["hd95_mm"] = [float(d) if math.isfinite(d) else None for d in dists]
    return row


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
    with hd95=True "hd95_mm" per class (None where infinite), and "largest_component": the
    same scores after `keep_largest_component` (the final report shows both)}."""
    results = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        scores = predict_volume(model, image, cfg.patch, cfg.spatial_dims, cfg.overlap, device)
        pred = scores.argmax(0).numpy()
        spacing = spacings[i] if spacings is not None else None
        row: dict[str, Any] = {
            "case": names[i] if names is not None else str(i),
            **_scores(pred, label, num_classes, spacing, hd95),
        }
        kept = keep_largest_component(pred, num_classes)
        row["largest_component"] = _scores(kept, label, num_classes, spacing, hd95)
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
