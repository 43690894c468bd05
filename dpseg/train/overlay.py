"""Overlay panels: a few held-out cases, each as the image, the truth and every model's
prediction on the slice with the most foreground, so a reader sees what a Dice hides (a DP
model's islands, a missed tail).

The slice is the one with the most truth voxels over all three axes: for an elongated organ
(a hippocampus runs front to back) that is a plane along it, where both of its parts show.
`dpseg train`, `dpseg evaluate` and `dpseg federate` draw them into their run folders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Panel", "best_slice", "draw_overlays", "pick_cases", "take_slice"]

# Label colours (RGBA, 1-based): anterior / liver orange, posterior blue, then more.
_COLOURS = np.array(
    [
        [0.99, 0.55, 0.24, 1],
        [0.17, 0.51, 0.73, 1],
        [0.30, 0.69, 0.29, 1],
        [0.89, 0.10, 0.11, 1],
        [0.60, 0.31, 0.64, 1],
    ]
)


@dataclass
class Panel:
    """One row: a case's preprocessed image, its truth and each model's label map (3-D,
    one grid), with each model's Dice to print above its prediction."""

    case: str
    image: np.ndarray
    truth: np.ndarray
    predictions: dict[str, np.ndarray]
    dice: dict[str, float] = field(default_factory=dict)


def best_slice(truth: np.ndarray) -> tuple[int, int]:
    """(axis, index) of the 2-D slice holding the most foreground voxels of `truth` (any axis;
    ties go to the lowest axis, then the lowest index). An empty truth gives the centre
    slice of the last axis."""
    fg = np.asarray(truth) > 0
    if not fg.any():
        return fg.ndim - 1, fg.shape[-1] // 2
    best = (-1, 0, 0)
    for axis in range(fg.ndim):
        other = tuple(a for a in range(fg.ndim) if a != axis)
        counts = fg.sum(axis=other)
        index = int(np.argmax(counts))
        if counts[index] > best[0]:
            best = (int(counts[index]), axis, index)
    return best[1], best[2]


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice, transposed for imshow(origin="lower"): the first remaining axis runs
    left to right, the second bottom to top (canonical RAS: superior or anterior up)."""
    return np.take(np.asarray(volume), index, axis=axis).T


def pick_cases(scores: Mapping[str, float], k: int = 4) -> list[str]:
    """k case names spread over the range of `scores` (worst, ..., best), so the panels show
    a failure and a success, not only typical cases. Ties broken by name."""
    ranked = sorted(scores, key=lambda n: (scores[n], n))
    if len(ranked) <= k:
        return ranked
    positions = np.linspace(0, len(ranked) - 1, k).round().astype(int)
    return [ranked[i] for i in dict.fromkeys(positions.tolist())]


def _label_rgba(labels: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros((*labels.shape, 4))
    for c in range(1, int(labels.max(initial=0)) + 1):
        colour = _COLOURS[(c - 1) % len(_COLOURS)].copy()
        colour[3] = alpha
        rgba[labels == c] = colour
    return rgba


def draw_overlays(
    path: str | Path,
    panels: Sequence[Panel],
    title: str | None = None,
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """One PNG: a row per panel (image | truth | each prediction), written atomically.
    The truth's outline is drawn over every prediction, so a miss shows as an empty contour
    and a false positive as colour outside one."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not panels:
        raise ValueError("draw_overlays needs at least one panel")
    path = Path(path)
    models = list(panels[0].predictions)
    cols = 2 + len(models)
    fig, axes = plt.subplots(
        len(panels), cols, figsize=(2.3 * cols, 2.4 * len(panels) + 0.6), squeeze=False
    )
    for row, panel in zip(axes, panels, strict=True):
        axis, index = best_slice(panel.truth)
        image = take_slice(panel.image, axis, index)
        truth = take_slice(panel.truth, axis, index)
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
        maps = [("image", None), ("truth", truth)] + [
            (m, take_slice(panel.predictions[m], axis, index)) for m in models
        ]
        for ax, (name, labels) in zip(row, maps, strict=True):
            ax.imshow(image, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
            if labels is not None:
                ax.imshow(_label_rgba(labels, 0.55), origin="lower")
            if labels is not None and name != "truth" and truth.any():
                ax.contour(truth > 0, levels=[0.5], colors="white", linewidths=0.7, origin="lower")
            text = name
            if name == "image":
                text = f"{panel.case}\n{'xyz'[axis]} = {index}"
            elif name in panel.dice:
                text = f"{name}\nDice {panel.dice[name]:.3f}"
            ax.set_title(text, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if label_names:
        handles = [
            Patch(color=_COLOURS[(c - 1) % len(_COLOURS)], label=f"{c} {n}")
            for c, n in sorted(label_names.items())
            if c > 0
        ]
        handles.append(Patch(facecolor="none", edgecolor="0.3", label="truth outline"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05 if label_names else 0, 1, 1))
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def validation_overlays(
    path: str | Path,
    model,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    rows: Sequence[Mapping],
    cfg,
    label_names: Mapping[int, str] | None = None,
    name: str = "prediction",
    k: int = 4,
    device="cpu",
) -> str | None:
    """`dpseg train`'s panels: k of the validation cases `rows` scored (dpseg.train.loop
    .evaluate's rows, in the order of `images`), from the worst to the best Dice, with the
    final model's prediction. Returns the PNG's file name, or None without cases."""
    from dpseg.train.loop import predict_volume

    if not rows:
        return None
    index = {r["case"]: i for i, r in enumerate(rows)}
    panels = []
    for case in pick_cases({r["case"]: r["dice"] for r in rows}, k):
        i = index[case]
        scores = predict_volume(model, images[i], cfg.patch, cfg.spatial_dims, cfg.overlap, device)
        pred = scores.argmax(0).numpy().astype(np.uint8)
        panels.append(Panel(case, images[i], labels[i], {name: pred}, {name: rows[i]["dice"]}))
    title = "held-out validation cases (inside the training list), final model"
    return draw_overlays(path, panels, title=title, label_names=label_names).name
