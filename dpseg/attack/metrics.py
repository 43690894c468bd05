"""Image similarity between an original and its reconstruction: SSIM (2D and 3D), PSNR, MSE.

SSIM follows Wang et al. (2004): an 11-tap Gaussian window with sigma 1.5 (per axis,
separable, normalised to sum 1), K1 = 0.01, K2 = 0.03, statistics weighted by that window
without the sample-covariance correction, and the SSIM map averaged over the "valid" region
only (positions where the whole window lies inside the image), so no padding value leaks
into the score. That is what skimage's ``structural_similarity(gaussian_weights=True,
use_sample_covariance=False)`` reports too, and it extends to 3D by filtering along the third
axis as well. ``data_range`` must be given: inferring it from the inputs would let a
reconstruction's contrast change the score's scale.

Inputs are single-channel arrays or tensors of shape (H, W), (D, H, W), or with leading
batch dims when ``spatial_dims`` says how many trailing dims are spatial; they are compared
in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["gaussian_window", "mse", "psnr", "ssim", "ssim_map"]

ArrayLike = np.ndarray | torch.Tensor

K1, K2 = 0.01, 0.03
WINDOW_SIZE, WINDOW_SIGMA = 11, 1.5


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> torch.Tensor:
    """The 1-D Gaussian taps (float64, sum 1), centred, ``size`` odd."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    if not sigma > 0:
        raise ValueError(f"window sigma must be > 0, got {sigma}")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(t**2) / (2 * sigma**2))
    return w / w.sum()


def _to64(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    tx = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    ty = y.detach() if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if tx.shape != ty.shape:
        raise ValueError(f"shapes differ: {tuple(tx.shape)} vs {tuple(ty.shape)}")
    return tx.to("cpu", torch.float64), ty.to("cpu", torch.float64)


def _as_pair(x: ArrayLike, y: ArrayLike, spatial_dims: int | None) -> tuple:
    tx, ty = _to64(x, y)
    nd = tx.dim() if spatial_dims is None else spatial_dims
    if nd not in (2, 3) or tx.dim() < nd:
        raise ValueError(
            f"expected a 2D or 3D single-channel image (optionally with leading batch dims), "
            f"got shape {tuple(tx.shape)} with spatial_dims={spatial_dims}"
        )
    return tx, ty, nd  # type: ignore[return-value]


def _check_range(data_range: float) -> float:
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range}")
    return float(data_range)


def mse(x: ArrayLike, y: ArrayLike) -> float:
    """Mean squared error over every element."""
    tx, ty = _to64(x, y)
    return float(((tx - ty) ** 2).mean())


def psnr(x: ArrayLike, y: ArrayLike, data_range: float) -> float:
    """``10 log10(data_range^2 / MSE)`` in dB; ``inf`` for identical inputs."""
    data_range = _check_range(data_range)
    err = mse(x, y)
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)


def _filter_valid(v: torch.Tensor, w: torch.Tensor, nd: int) -> torch.Tensor:
    """Separable Gaussian filtering of (N, 1, *S) with no padding: output shrinks by size-1."""
    for axis in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = w.numel()
        conv = F.conv2d if nd == 2 else F.conv3d
        v = conv(v, w.view(shape))
    return v


def ssim_map(
    x: ArrayLike,
    y: ArrayLike,
    data_range: float,
    spatial_dims: int | None = None,
    window_size: int = WINDOW_SIZE,
    sigma: float = WINDOW_SIGMA,
) -> torch.Tensor:
    """The local SSIM over the valid region, shape (*batch, *(S - window_size + 1))."""
    data_range = _check_range(data_range)
    tx, ty, nd = _as_pair(x, y, spatial_dims)
    spatial = tuple(tx.shape[tx.dim() - nd :])
    if min(spatial) < window_size:
        raise ValueError(
            f"SSIM with an {window_size}-voxel window needs every spatial size >= "
            f"{window_size}, got {spatial}; use a larger patch or a smaller window_size"
        )
    batch = tuple(tx.shape[: tx.dim() - nd])
    w = gaussian_window(window_size, sigma)
    a = tx.reshape(-1, 1, *spatial)
    b = ty.reshape(-1, 1, *spatial)
    mu_a, mu_b = _filter_valid(a, w, nd), _filter_valid(b, w, nd)
    var_a = _filter_valid(a * a, w, nd) - mu_a**2
    var_b = _filter_valid(b * b, w, nd) - mu_b**2
    cov = _filter_valid(a * b, w, nd) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    out = num / den
    return out.reshape(*batch, *out.shape[2:])


def ssim(
    x: ArrayLike,
    y: ArrayLike,
    data_range: float,
    spatial_dims: int | None = None,
    window_size: int = WINDOW_SIZE,
    sigma: float = WINDOW_SIGMA,
) -> float:
    """Mean SSIM (Wang et al. 2004) of two single-channel 2D or 3D images.

    ``spatial_dims`` defaults to ``x.ndim`` (an (H, W) or (D, H, W) input); with leading
    batch dims, pass it, and the mean runs over the batch too.
    """
    return float(ssim_map(x, y, data_range, spatial_dims, window_size, sigma).mean())
