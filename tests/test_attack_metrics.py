"""SSIM / PSNR / MSE against an independent formulation (scipy.ndimage + numpy)."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from dpseg.attack.metrics import gaussian_window, mse, psnr, ssim


def ssim_scipy(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. written independently: scipy's Gaussian filter (sigma 1.5, truncate 3.5
    gives radius 5, i.e. the 11-tap window), then only voxels whose window fits are kept."""
    x, y = x.astype(np.float64), y.astype(np.float64)

    def f(v):
        return ndimage.gaussian_filter(v, sigma=1.5, truncate=3.5, mode="constant")

    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    crop = tuple(slice(5, n - 5) for n in x.shape)
    return float(m[crop].mean())


@pytest.mark.parametrize(
    "shape, data_range",
    [((23, 31), 1.0), ((11, 11), 1.0), ((40, 17), 255.0), ((13, 17, 19), 1.0), ((24, 12, 16), 2.5)],
)
def test_ssim_matches_scipy_formulation(shape, data_range):
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape) * data_range
    # A correlated, noisier copy so SSIM is far from both 0 and 1.
    y = np.clip(0.7 * x + 0.3 * data_range * rng.random(shape), 0, data_range)
    assert ssim(x, y, data_range) == pytest.approx(ssim_scipy(x, y, data_range), abs=1e-10)
    # torch float32 inputs go through the same float64 path.
    t = ssim(torch.from_numpy(x).float(), torch.from_numpy(y).float(), data_range)
    assert t == pytest.approx(
        ssim_scipy(x.astype(np.float32), y.astype(np.float32), data_range), abs=1e-6
    )


def test_ssim_properties():
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 20)), rng.random((20, 20))
    assert ssim(x, x, 1.0) == pytest.approx(1.0)
    assert ssim(x, y, 1.0) == pytest.approx(ssim(y, x, 1.0))
    assert ssim(x, y, 1.0) < 0.2  # independent noise
    # Leading batch dims: the mean over the items.
    both = ssim(np.stack([x, y]), np.stack([y, y]), 1.0, spatial_dims=2)
    assert both == pytest.approx((ssim(x, y, 1.0) + 1.0) / 2)


def test_ssim_rejects_bad_inputs():
    with pytest.raises(ValueError, match="window"):
        ssim(np.zeros((10, 30)), np.zeros((10, 30)), 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(np.zeros((16, 16)), np.zeros((16, 17)), 1.0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(np.zeros((16, 16)), np.zeros((16, 16)), 0.0)


def test_gaussian_window():
    w = gaussian_window()
    assert w.numel() == 11 and float(w.sum()) == pytest.approx(1.0)
    ref = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    np.testing.assert_allclose(w.numpy(), ref / ref.sum(), rtol=1e-12)


def test_psnr_and_mse_match_numpy():
    rng = np.random.default_rng(3)
    x, y = rng.random((9, 10, 11)), rng.random((9, 10, 11))
    ref_mse = float(np.mean((x - y) ** 2))
    assert mse(x, y) == pytest.approx(ref_mse, rel=1e-12)
    assert psnr(x, y, 2.0) == pytest.approx(10 * math.log10(4.0 / ref_mse), rel=1e-12)
    assert psnr(x, x, 1.0) == math.inf
