"""Windowing, normalisation and resampling, against closed forms."""

import numpy as np
import pytest

from dpseg.data import (
    MSDDataset,
    Preprocessing,
    normalize_percentile,
    resample_to_shape,
    resample_to_spacing,
    resampled_affine,
    window,
    zscore,
)


def test_window_maps_hu_linearly_and_clips():
    hu = np.array([-1000.0, -200.0, 50.0, 300.0, 1500.0])
    np.testing.assert_allclose(window(hu, -200, 300), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert window(hu).dtype == np.float32
    with pytest.raises(ValueError):
        window(hu, 10, 10)


def test_zscore_and_percentile():
    rng = np.random.default_rng(0)
    x = rng.normal(7.0, 3.0, (20, 20, 20))
    z = zscore(x)
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    x[0, 0, 0] = 1e6  # one hot voxel must not squeeze the range
    y = normalize_percentile(x, 1.0, 99.0)
    assert y.min() == 0.0 and y.max() == 1.0
    lo, hi = np.percentile(x, [1.0, 99.0])
    inside = (x > lo) & (x < hi)
    np.testing.assert_allclose(y[inside], (x[inside] - lo) / (hi - lo), rtol=1e-5)
    assert 0.4 < np.median(y) < 0.6


def test_resampling_a_linear_ramp_matches_its_affine():
    # Linear interpolation reproduces a linear function exactly, so sampling the ramp
    # f(world) at the new voxel centres (given by resampled_affine) is an oracle for both the
    # resampling and the affine; borders are clamped, so only the interior is compared.
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.0]
    shape = (20, 24, 12)
    coeff = np.array([0.3, -0.7, 0.2])
    idx = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:]
    ramp = (coeff @ world).reshape(shape).astype(np.float32)

    out = resample_to_spacing(ramp, (2.0, 1.5, 3.0), (1.0, 1.0, 1.5), order=1)
    assert out.shape == (40, 36, 24)
    new_affine = resampled_affine(affine, shape, out.shape)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [1.0, 1.0, 1.5])
    nidx = np.indices(out.shape).reshape(3, -1)
    expected = (coeff @ (new_affine[:3, :3] @ nidx + new_affine[:3, 3:])).reshape(out.shape)
    interior = (slice(2, -2),) * 3
    np.testing.assert_allclose(out[interior], expected[interior], atol=1e-4)
    # Same physical extent: the grid centre stays put.
    centre = lambda a, s: a[:3, :3] @ ((np.asarray(s) - 1) / 2) + a[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(new_affine, out.shape), centre(affine, shape))


def test_label_resampling_is_nearest_and_round_trips():
    rng = np.random.default_rng(1)
    label = np.kron(rng.integers(0, 3, (5, 5, 5)), np.ones((4, 4, 4))).astype(np.uint8)
    half = resample_to_shape(label, (10, 10, 10), order=0)
    assert half.dtype == np.uint8 and set(np.unique(half)) <= {0, 1, 2}
    np.testing.assert_array_equal(resample_to_shape(half, label.shape, order=0), label)


@pytest.mark.real_data
def test_preprocessing_real_ct_keeps_liver_volume(shared_data):
    ds = MSDDataset(shared_data / "liver_ct_mini")
    image, label = ds.load(1)  # 0.98 x 0.98 x 2 mm
    img, lab, affine = Preprocessing(target_spacing=(2.0, 2.0, 2.0)).apply(image, label)
    assert img.shape == lab.shape == (250, 250, 20)  # 512 * 0.977 mm / 2 mm
    assert 0.0 <= img.min() and img.max() <= 1.0
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [2.0, 2.0, 2.0])
    ml_before = (label.array > 0).sum() * np.prod(image.spacing)
    ml_after = (lab > 0).sum() * 8.0
    assert abs(ml_after / ml_before - 1) < 0.02
    # The windowed liver sits mid-window: 0 HU..150 HU -> 0.4..0.7.
    assert 0.4 < img[lab > 0].mean() < 0.7
