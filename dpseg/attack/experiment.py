"""One attack experiment: a real CT target, a U-Net (at init or briefly trained), the update
the site shares under each defence, the inversion of each, and the random-gradient
baseline, scored against the original with SSIM/PSNR/MSE.

The target batch is B slices (2D) or patches (3D) of one case around its foreground: the
b-th is centred on the foreground voxels of the b-th z-quantile, so a batch spreads over the
organ instead of repeating near-identical neighbours. The model is trained, when asked, on
the *other* cases of the dataset (on the target case only when it is alone): the server's
model at a later round, which has not seen this patient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from dpseg.data import MSDDataset, PatchDataset, Preprocessing
from dpseg.models import UNet
from dpseg.train.losses import DiceCELoss

from .defences import Defence, random_update, shared_update
from .inversion import (
    InversionConfig,
    ThreatModel,
    gradient_distance,
    one_hot,
    reconstruct,
    simulate_update,
)
from .metrics import mse, psnr, ssim

__all__ = [
    "ExperimentConfig",
    "load_target",
    "mask_reference",
    "matching_floor",
    "path_profile",
    "run_experiment",
    "train_model",
]

DATA_RANGE = 1.0  # the liver window [-200, 300] HU mapped to [0, 1]: the attack's box
# An SSIM within this of the baseline's is reported as "no better than the baseline"; the
# baseline's own SSIM varies by about this much between random draws at 64x64.
BASELINE_MARGIN = 0.05
# How finely the undefended update pins the image down: its distance to the update of the
# original plus Gaussian noise of this std (PSNR 40 dB, SSIM ~0.98 on the window). A
# reconstruction at or below that distance matches the update as well as images that are
# indistinguishable from the original do, so what it still gets wrong is not pinned down by
# the update at that distance; one above it has not been matched that well yet.
FLOOR_NOISE = 0.01
# Points on the straight path from the original (t = 0) to the reconstruction (t = 1) at
# which the gradient distance is measured: dense near the original, where it rises fastest.
PATH_POINTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class ExperimentConfig:
    data: Path
    case: str
    dims: int = 2
    patch: int = 64
    batch: int = 1
    defences: list[Defence] = field(default_factory=list)
    channels: tuple[int, ...] = (8, 16, 32)
    train_steps: int = 0
    local_steps: int = 0
    local_lr: float = 0.01
    inversion: InversionConfig = field(default_factory=InversionConfig)
    seed: int = 0


@dataclass
class Target:
    images: torch.Tensor  # (B, 1, *S) float32 in [0, 1]
    labels: torch.Tensor  # (B, *S) int64
    centres: list[list[int]]  # voxel centre of each item in the canonical volume


def _crop_start(centre: int, size: int, extent: int) -> int:
    return int(min(max(centre - size // 2, 0), extent - size))


def load_target(dataset: MSDDataset, index: int, dims: int, patch: int, batch: int) -> Target:
    """B windowed slices/patches of case ``index`` around its foreground (see module doc)."""
    image, label, _ = Preprocessing(normalize="window").apply(*dataset.load(index))
    need = (patch, patch) if dims == 2 else (patch,) * 3
    if any(p > s for p, s in zip(need, image.shape, strict=False)):
        raise ValueError(
            f"--patch {patch} does not fit case {dataset.cases[index].name} of shape "
            f"{image.shape}; use --patch <= {min(image.shape[: len(need)])}"
        )
    fg = np.argwhere(label > 0)
    if len(fg) == 0:  # no organ: spread over the volume's centre instead
        fg = np.array([[s // 2 for s in image.shape]])
    order = fg[np.argsort(fg[:, 2], kind="stable")]
    images, labels, centres = [], [], []
    for part in np.array_split(order, batch):
        c = (part if len(part) else order).mean(0).round().astype(int)
        if dims == 2:
            sl = tuple(slice(_crop_start(c[a], patch, image.shape[a]), None) for a in range(2))
            sl = tuple(slice(s.start, s.start + patch) for s in sl) + (int(c[2]),)
        else:
            sl = tuple(slice(_crop_start(c[a], patch, image.shape[a]), None) for a in range(3))
            sl = tuple(slice(s.start, s.start + patch) for s in sl)
        images.append(np.ascontiguousarray(image[sl]))
        labels.append(np.ascontiguousarray(label[sl]))
        centres.append([int(v) for v in c])
    x = torch.from_numpy(np.stack(images)).float().unsqueeze(1)
    y = torch.from_numpy(np.stack(labels).astype(np.int64))
    return Target(x, y, centres)


def train_model(
    model: UNet, dataset: MSDDataset, exclude: int, dims: int, patch: int, steps: int, seed: int
) -> list[float]:
    """A few non-private Adam steps on patches of the other cases; returns the losses."""
    if steps <= 0:
        return []
    indices = [i for i in range(len(dataset)) if i != exclude] or [exclude]
    patches = PatchDataset.from_msd(
        dataset, (patch,) * dims, indices=indices, spatial_dims=dims, seed=seed, p_foreground=0.5
    )
    loss_fn, opt = DiceCELoss(), torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for step in range(steps):
        items = [patches[(step * 4 + k) % len(patches)] for k in range(4)]
        x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _scores(original: torch.Tensor, rec: torch.Tensor, dims: int, match: bool) -> dict:
    """Mean SSIM/PSNR/MSE over the batch; with ``match``, items are paired by the best
    assignment first (a jointly optimised batch comes back in no particular order)."""
    b = original.shape[0]
    grid = [[ssim(rec[j, 0], original[i, 0], DATA_RANGE) for j in range(b)] for i in range(b)]
    cols = list(range(b))
    if match and b > 1:
        _, cols = linear_sum_assignment(-np.array(grid))
    pairs = [(original[i, 0], rec[int(cols[i]), 0]) for i in range(b)]
    return {
        "ssim": float(np.mean([grid[i][int(cols[i])] for i in range(b)])),
        "psnr": float(np.mean([psnr(r, o, DATA_RANGE) for o, r in pairs])),
        "mse": float(np.mean([mse(r, o) for o, r in pairs])),
        "order": [int(c) for c in cols],
    }


def _mask_dice(true: torch.Tensor, found: torch.Tensor) -> float:
    t, f = true > 0, found > 0
    denom = int(t.sum() + f.sum())
    return 1.0 if denom == 0 else 2.0 * int((t & f).sum()) / denom


def _distance_to(
    model: UNet,
    loss: DiceCELoss,
    image: torch.Tensor,
    probs: torch.Tensor,
    target: list[torch.Tensor],
    threat: ThreatModel,
) -> float:
    """Gradient distance between the update ``image`` would produce and ``target``."""
    update = [u.detach() for u in simulate_update(model, image, probs, loss, threat)]
    return float(gradient_distance(update, target))


def matching_floor(
    model: UNet,
    loss: DiceCELoss,
    x: torch.Tensor,
    y: torch.Tensor,
    plain: list[torch.Tensor],
    threat: ThreatModel,
    seed: int,
) -> dict:
    """The gradient distance and SSIM of the original plus ``FLOOR_NOISE`` noise (see there)."""
    gen = torch.Generator().manual_seed(seed)
    noisy = (x + FLOOR_NOISE * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)
    probs = one_hot(y, model.out_channels)
    return {
        "noise_std": FLOOR_NOISE,
        "grad_distance": _distance_to(model, loss, noisy, probs, plain, threat),
        "ssim": _scores(x, noisy, x.dim() - 2, match=False)["ssim"],
    }


def path_profile(
    model: UNet,
    loss: DiceCELoss,
    x: torch.Tensor,
    y: torch.Tensor,
    rec: torch.Tensor,
    target: list[torch.Tensor],
    threat: ThreatModel,
    points: tuple[float, ...] = PATH_POINTS,
) -> dict:
    """The gradient distance and SSIM along the straight path x + t (rec - x), t in ``points``.

    Tells a reconstruction stuck in another valley of the gradient distance from one the
    update cannot tell apart from the original. If the distance rises on the way above the
    reconstruction's (``barrier`` > 0), images near the original match the update better
    than the reconstruction does, and the two are separated by a ridge along this line:
    the attack's optimiser, not the update, stopped short. ``basin_t`` is the farthest point
    from the original, before that rise, that still matches at least as well as the
    reconstruction, and ``basin_ssim`` the lowest SSIM up to it (on this line; the
    original's valley may reach farther in other directions). Both are None when the
    reconstruction matches better than the original itself (a defended or noisy target).
    """
    probs = one_hot(y, model.out_channels)
    dist, scores = [], []
    for t in points:
        xt = x + t * (rec - x)
        dist.append(_distance_to(model, loss, xt, probs, target, threat))
        scores.append(_scores(x, xt, x.dim() - 2, match=False)["ssim"])
    end = dist[-1]
    above = [i for i, d in enumerate(dist) if d > end + 1e-6]  # 1e-6: float32 round-off
    if not above:  # never worse than the reconstruction: all of the line is in the valley
        basin: int | None = len(points) - 1
    elif above[0] == 0:  # the original itself matches worse
        basin = None
    else:
        basin = above[0] - 1
    return {
        "t": list(points),
        "grad_distance": dist,
        "ssim": scores,
        "barrier": max(dist) - end,
        "basin_t": points[basin] if basin is not None else None,
        "basin_ssim": min(scores[: basin + 1]) if basin is not None else None,
    }


def mask_reference(x: torch.Tensor, y: torch.Tensor) -> dict:
    """SSIM of the mask painted with the original's mean intensity inside and outside it:
    what knowing the mask and two intensities gives. An attack that scores near this has
    shown the mask (which a known-mask attacker was given), not the image."""
    fg = (y > 0).unsqueeze(1).to(x.dtype)
    inside = (x * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp_min(1)
    outside = (x * (1 - fg)).flatten(1).sum(1) / (1 - fg).flatten(1).sum(1).clamp_min(1)
    view = (-1,) + (1,) * (x.dim() - 1)
    painted = fg * inside.view(view) + (1 - fg) * outside.view(view)
    return {"ssim": _scores(x, painted, x.dim() - 2, match=False)["ssim"]}


def run_experiment(
    cfg: ExperimentConfig, progress: Callable[[str, int], None] | None = None
) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
    """Runs every defence and the baseline. Returns (report, reconstructions by name, the
    original batch). ``progress(name, n)`` is called as iterations complete."""
    t0 = time.perf_counter()
    dataset = MSDDataset(cfg.data)
    names = [c.name for c in dataset.cases]
    index = names.index(cfg.case)
    target = load_target(dataset, index, cfg.dims, cfg.patch, cfg.batch)
    model = UNet(cfg.dims, 1, 2, channels=cfg.channels, seed=cfg.seed)
    train_losses = train_model(
        model, dataset, index, cfg.dims, cfg.patch, cfg.train_steps, cfg.seed
    )
    loss = DiceCELoss()
    x, y = target.images, target.labels
    joint = cfg.inversion.mask == "joint"

    def attack(
        name: str, update: list[torch.Tensor], clip: float | None
    ) -> tuple[dict, torch.Tensor]:
        start = time.perf_counter()
        threat = ThreatModel(local_steps=cfg.local_steps, local_lr=cfg.local_lr, clip=clip)
        res = reconstruct(
            model,
            loss,
            update,
            x.shape,
            labels=y,
            config=cfg.inversion,
            threat=threat,
            progress=(lambda n: progress(name, n)) if progress else None,
        )
        row = _scores(x, res.images, cfg.dims, match=joint)
        if joint:
            order = row["order"]
            row["mask_dice"] = float(
                np.mean([_mask_dice(y[i], res.labels[order[i]]) for i in range(len(order))])
            )
        row.update(grad_distance=res.distance, seconds=round(time.perf_counter() - start, 1))
        # A jointly optimised batch comes back in no particular order: item i of what is
        # returned (figure, saved arrays) is the one paired with original item i.
        images = res.images[row.pop("order")]
        if name == "none" and not joint:  # (the path needs the known mask)
            row["path"] = path_profile(model, loss, x, y, images, update, threat)
        return row, images

    rows, recs = [], {}
    plain = shared_update(
        model, loss, x, y, Defence("none"), local_steps=cfg.local_steps, local_lr=cfg.local_lr
    )
    for k, d in enumerate(cfg.defences):
        update = (
            plain
            if not d.clips
            else shared_update(
                model,
                loss,
                x,
                y,
                d,
                local_steps=cfg.local_steps,
                local_lr=cfg.local_lr,
                seed=cfg.seed * 1000 + k,
            )
        )
        norm = math.sqrt(sum(float(u.double().norm()) ** 2 for u in update))
        row, rec = attack(d.name, update, d.max_grad_norm)
        rows.append(
            {
                "name": d.name,
                "noise_multiplier": d.noise_multiplier,
                "max_grad_norm": d.max_grad_norm,
                "update_norm": norm,
                **row,
            }
        )
        recs[d.name] = rec
    # The baseline: an isotropic Gaussian direction with the undefended update's norm. DP's
    # noise is isotropic and, at batch 1 and C = 1, tens to hundreds of times the clipped
    # signal, so this is the null that isolates what a defended update's signal adds.
    # Per-layer norms copied from the undefended update would carry that update's layer
    # profile, which DP's noise does not have.
    base_row, base_rec = attack("baseline", random_update(plain, seed=cfg.seed + 7), None)
    baseline = {
        "name": "random-gradient",
        "noise_multiplier": None,
        "max_grad_norm": None,
        **base_row,
    }
    recs["random-gradient"] = base_rec
    floor = matching_floor(
        model, loss, x, y, plain, ThreatModel(cfg.local_steps, cfg.local_lr), cfg.seed + 11
    )
    for row in rows:
        row["ssim_over_baseline"] = row["ssim"] - baseline["ssim"]
        row["no_better_than_baseline"] = row["ssim_over_baseline"] <= BASELINE_MARGIN
    inv = asdict(cfg.inversion)
    report = {
        "case": cfg.case,
        "dims": cfg.dims,
        "patch": cfg.patch,
        "batch": cfg.batch,
        "target_centres": target.centres,
        "model": {
            "channels": list(cfg.channels),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_steps": cfg.train_steps,
            "train_loss_last": train_losses[-1] if train_losses else None,
        },
        "setting": "gradient" if cfg.local_steps == 0 else f"{cfg.local_steps} local SGD steps",
        "local_lr": cfg.local_lr if cfg.local_steps else None,
        "inversion": {**inv, "box": list(inv["box"])},
        "data_range": DATA_RANGE,
        "baseline_margin": BASELINE_MARGIN,
        "defences": rows,
        "baseline": baseline,
        "matching_floor": floor,
        "mask_reference": mask_reference(x, y),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return report, recs, x
