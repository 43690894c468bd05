"""Evaluation metrics per case: Dice per class and the 95% Hausdorff distance in mm.

Conventions (the ones the MSD / nnU-Net evaluations use, stated so reports can be read):

- Dice of a class absent from both prediction and reference is 1.0 (nothing to find,
  nothing found). Absent from one only: 0.0.
- HD95 with both masks empty is 0.0 (they agree); with exactly one empty it is ``inf``
  (no surface to measure to). Averages over cases should report how many were inf
  rather than let one inf swallow the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["dice_per_class", "hausdorff95", "surface_voxels"]


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def dice_per_class(
    pred_labels: np.ndarray | torch.Tensor,
    target_labels: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_background: bool = True,
) -> np.ndarray:
    """Hard Dice of one case per class: ``2 |P_c & T_c| / (|P_c| + |T_c|)``.

    ``pred_labels`` and ``target_labels`` are integer label maps of one case, same shape
    (any number of dims; for a batch, call once per case). Returns a float64 array of length
    ``num_classes - 1`` (classes 1..C-1) when ``ignore_background`` else ``num_classes``.
    A class empty in both maps scores 1.0.
    """
    pred = _to_numpy(pred_labels)
    target = _to_numpy(target_labels)
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction and target must have the same shape, got {pred.shape} and {target.shape}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    first = 1 if ignore_background else 0
    out = np.empty(num_classes - first, dtype=np.float64)
    for i, c in enumerate(range(first, num_classes)):
        p = pred == c
        t = target == c
        denom = int(p.sum()) + int(t.sum())
        out[i] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom
    return out


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one face neighbour (or the volume edge) outside.

    Face connectivity (6 in 3D, 4 in 2D); the volume border counts as background, so a
    mask touching the edge has a surface there.
    """
    mask = mask.astype(bool)
    if not mask.any():
        return mask
    struct = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=struct, border_value=0)
    return mask & ~eroded


def hausdorff95(
    pred_mask: np.ndarray | torch.Tensor,
    target_mask: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | None = None,
) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two binary masks, in mm.

    Distances are measured between surface voxels (see :func:`surface_voxels`), scaled by
    ``spacing`` (one value per axis, mm; default 1). The directed distances from every
    predicted surface voxel to the target surface and from every target surface voxel to
    the predicted surface are pooled, and their 95th percentile (linear interpolation,
    ``numpy.percentile``'s default) is returned.

    Both masks empty: 0.0. Exactly one empty: ``inf``.
    """
    pred = _to_numpy(pred_mask).astype(bool)
    target = _to_numpy(target_mask).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction and target must have the same shape, got {pred.shape} and {target.shape}"
        )
    if spacing is None:
        spacing = (1.0,) * pred.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing needs {pred.ndim} values for a {pred.ndim}-D mask: {spacing}")
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")

    has_p, has_t = bool(pred.any()), bool(target.any())
    if not has_p and not has_t:
        return 0.0
    if not has_p or not has_t:
        return float("inf")

    sp = surface_voxels(pred)
    st = surface_voxels(target)
    # distance_transform_edt gives, at each voxel, the distance to the nearest zero; zeros
    # placed on one surface turn it into "distance to that surface" in mm.
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d = np.concatenate([dist_to_t[sp], dist_to_p[st]])
    return float(np.percentile(d, 95))
