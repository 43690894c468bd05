"""Sliding-window inference over whole volumes (2D or 3D).

Models are trained on patches; a whole CT is larger. The volume is tiled with overlapping
windows, each window is predicted, and the predictions are blended with an importance map
that favours window centres (a U-Net sees least context at a patch border, so its border
predictions are the least reliable).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["sliding_window_inference", "gaussian_importance_map", "window_starts"]


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts along one axis; the last window ends at ``size``.

    The stride is at most ``patch * (1 - overlap)``; windows are spread evenly so that no
    window hangs off the end (``size >= patch`` is required: pad first).
    """
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    return sorted({round(i * (size - patch) / (n - 1)) for i in range(n)})


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Separable Gaussian centred on the patch, sigma = ``sigma_scale * patch``, max 1.

    The floor is the smallest positive value so that every voxel keeps a nonzero weight
    (a corner voxel covered by a single window must not divide by zero). 1/8 of the patch
    is nnU-Net's choice: the border gets ~e^-8 of the centre's weight.
    """
    w = None
    for p in patch_size:
        x = torch.arange(p, dtype=torch.float64, device=device)
        sigma = max(sigma_scale * p, 1e-6)
        g = torch.exp(-0.5 * ((x - (p - 1) / 2.0) / sigma) ** 2)
        w = g if w is None else w[..., None] * g
    w = w / w.max()
    positive = w[w > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=w.dtype)
    return w.clamp_min(floor).to(dtype)


@torch.no_grad()
def sliding_window_inference(
    volume: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    patch_size: int | Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 1,
    mode: str = "gaussian",
    progress: bool = False,
    softmax: bool = False,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Predict a whole volume ``(C, *S)`` patch by patch; returns ``(out_channels, *S)``.

    Args:
        volume: one case, channels first, 2 or 3 spatial dims, on the model's device.
        model: maps ``(N, C, *patch_size)`` to ``(N, out_channels, *patch_size)``; put it in
            eval mode first.
        patch_size: one int for every axis or one per axis.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per model call.
        mode: ``"gaussian"`` (importance weighting) or ``"constant"`` (plain average).
        progress: a tqdm bar over windows.
        softmax: return averaged softmax probabilities instead of averaged logits.
        pad_value: fill for volumes smaller than the patch (0 = the mean of a normalized
            CT; pass the background intensity if the input is not normalized).

    Axes smaller than the patch are padded (evenly on both sides) and the output is cropped
    back, so the output always has the volume's spatial shape. The output is float32 (or the
    model's float dtype), on the volume's device.
    """
    if volume.dim() not in (3, 4):
        raise ValueError(
            f"volume must be (C, H, W) or (C, D, H, W), got shape {tuple(volume.shape)}; "
            "pass one case without the batch dim"
        )
    nd = volume.dim() - 1
    patch = (int(patch_size),) * nd if isinstance(patch_size, int) else tuple(patch_size)
    if len(patch) != nd or min(patch) < 1:
        raise ValueError(f"patch_size needs {nd} positive sizes for a {nd}-D volume: {patch}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    size = tuple(volume.shape[1:])
    # Pad axes shorter than the patch: F.pad takes (last_lo, last_hi, ..., first_lo, first_hi).
    lo = [max(p - s, 0) // 2 for s, p in zip(size, patch, strict=True)]
    hi = [max(p - s, 0) - a for s, p, a in zip(size, patch, lo, strict=True)]
    pad = [v for a, b in zip(reversed(lo), reversed(hi), strict=True) for v in (a, b)]
    x = F.pad(volume, pad, value=pad_value) if any(pad) else volume
    padded = tuple(x.shape[1:])

    starts = list(
        itertools.product(
            *(window_starts(s, p, overlap) for s, p in zip(padded, patch, strict=True))
        )
    )
    if mode == "gaussian":
        weight = gaussian_importance_map(patch, device=x.device)
    else:
        weight = torch.ones(patch, device=x.device)

    out = norm = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="sliding window", unit="win")
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        slices = [
            tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True)) for start in chunk
        ]
        pred = model(torch.stack([x[(slice(None), *sl)] for sl in slices]))
        if pred.shape[0] != len(chunk) or tuple(pred.shape[2:]) != patch:
            raise ValueError(
                f"model must map (N, C, *{patch}) to (N, K, *{patch}); got {tuple(pred.shape)}"
            )
        if softmax:
            pred = torch.softmax(pred, dim=1)
        if out is None:
            dtype = pred.dtype if pred.dtype.is_floating_point else torch.float32
            out = torch.zeros((pred.shape[1], *padded), dtype=dtype, device=x.device)
            norm = torch.zeros(padded, dtype=dtype, device=x.device)
            weight = weight.to(dtype)
        for k, sl in enumerate(slices):
            out[(slice(None), *sl)] += pred[k].to(out) * weight
            norm[sl] += weight
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()

    out /= norm
    crop = tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))
    return out[(slice(None), *crop)]
