"""Intensity normalisation and resampling, so that sites with different scanners look alike.

CT is calibrated (Hounsfield units), so a fixed window is the right normalisation: [-200, 300]
HU keeps fat, soft tissue, liver and contrast-enhanced vessels apart and clips air and bone,
which the liver task does not need. MR has no absolute scale, so it is normalised by its own
percentiles. Resampling brings every site to one voxel size (sites differ 0.7-5 mm) with
linear interpolation for images and nearest neighbour for labels, which must stay integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from .nifti import Volume

__all__ = [
    "window",
    "zscore",
    "normalize_percentile",
    "resample_to_spacing",
    "resample_to_shape",
    "resampled_affine",
    "Preprocessing",
]

LIVER_WINDOW_HU: tuple[float, float] = (-200.0, 300.0)


def window(hu: np.ndarray, low: float = -200.0, high: float = 300.0) -> np.ndarray:
    """Clip CT to [low, high] HU and scale linearly to [0, 1] (float32)."""
    if not high > low:
        raise ValueError(f"window needs high > low, got [{low}, {high}]")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def zscore(x: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Zero mean, unit variance, statistics taken inside `mask` (default: all voxels)."""
    x = np.asarray(x, dtype=np.float32)
    ref = x[mask] if mask is not None else x
    if ref.size == 0:
        raise ValueError("zscore mask selects no voxels")
    mean, std = float(ref.mean(dtype=np.float64)), float(ref.std(dtype=np.float64))
    return ((x - np.float32(mean)) / np.float32(max(std, eps))).astype(np.float32)


def normalize_percentile(
    x: np.ndarray,
    lower: float = 0.5,
    upper: float = 99.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """MR normalisation: clip to the [lower, upper] percentiles and scale to [0, 1].

    Percentiles rather than min/max because MR has isolated hot voxels (flow, fat
    suppression failures) that would squeeze the useful range. `mask` (e.g. x > 0)
    restricts the statistics to the body so a large empty background does not dominate.
    """
    x = np.asarray(x, dtype=np.float32)
    ref = x[mask] if mask is not None else x
    lo, hi = np.percentile(ref, [lower, upper]) if ref.size else (0.0, 1.0)
    if hi <= lo:  # constant image: nothing to scale
        return np.zeros_like(x)
    out = (x - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def resampled_affine(
    affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]
) -> np.ndarray:
    """Affine of a grid covering the same extent as (affine, old_shape) with new_shape voxels.

    Matches scipy's grid_mode=True: voxel edges (not centres) of the old and new grid align,
    so new voxel j has old index (j + 0.5) * s - 0.5 with s = old/new.
    """
    s = np.asarray(old_shape, float) / np.asarray(new_shape, float)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(s)
    index_map[:3, 3] = 0.5 * s - 0.5
    return np.asarray(affine, float) @ index_map


def resample_to_shape(array: np.ndarray, shape: Sequence[int], *, order: int) -> np.ndarray:
    """Resample a 3-D array to `shape` over the same extent (order 0 for labels, 1 images)."""
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape) == shape:
        return array.copy()
    factors = [n / o for n, o in zip(shape, array.shape, strict=True)]
    src = array.astype(np.float32) if order > 0 else array
    out = ndimage.zoom(src, factors, order=order, mode="nearest", grid_mode=True)
    assert out.shape == shape, (out.shape, shape)  # zoom rounds; factors are exact ratios
    return out.astype(array.dtype if order == 0 else np.float32, copy=False)


def resample_to_spacing(
    array: np.ndarray,
    spacing: Sequence[float],
    target: Sequence[float],
    *,
    order: int,
) -> np.ndarray:
    """Resample a 3-D array from voxel size `spacing` to about `target` mm.

    The new shape is round(shape * spacing / target), so the actual spacing differs from
    target by under half a voxel over the whole extent; `resampled_affine` gives it exactly.
    """
    shape = [
        max(1, int(round(n * s / t))) for n, s, t in zip(array.shape, spacing, target, strict=True)
    ]
    return resample_to_shape(array, shape, order=order)


@dataclass(frozen=True)
class Preprocessing:
    """What to do to every case before patches are drawn: one object shared by all sites.

    normalize: "window" (CT -> [0, 1]), "zscore" (CT clipped to the window, then standardised),
    "percentile" (MR -> [0, 1]) or "none". target_spacing in mm, or None to keep each
    volume's own grid.
    """

    normalize: Literal["window", "zscore", "percentile", "none"] = "window"
    window: tuple[float, float] = LIVER_WINDOW_HU
    percentiles: tuple[float, float] = (0.5, 99.5)
    target_spacing: tuple[float, float, float] | None = None

    def intensities(self, image: np.ndarray) -> np.ndarray:
        if self.normalize == "window":
            return window(image, *self.window)
        if self.normalize == "zscore":
            return zscore(np.clip(image, *self.window))
        if self.normalize == "percentile":
            return normalize_percentile(image, *self.percentiles)
        if self.normalize == "none":
            return np.asarray(image, dtype=np.float32)
        raise ValueError(f"unknown normalize={self.normalize!r}")

    def apply(
        self, image: Volume, label: Volume | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(normalised image, label or None, affine of the returned grid)."""
        img, lab, affine = image.array, None if label is None else label.array, image.affine
        if self.target_spacing is not None:
            old_shape = img.shape
            img = resample_to_spacing(img, image.spacing, self.target_spacing, order=1)
            if lab is not None:
                lab = resample_to_shape(lab, img.shape, order=0)
            affine = resampled_affine(affine, old_shape, img.shape)
        return self.intensities(img), lab, affine
