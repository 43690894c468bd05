"""Patch sampling: shapes, foreground oversampling against an exact probability, padding, 2-D."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dpseg.data import MSDDataset, PatchDataset, extract_patch, pad_to_shape, write_phantom_dataset


def _volume(shape=(40, 36, 30), cube=((30, 36), (2, 8), (20, 26))):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(a, b) for a, b in cube)] = 1
    return image, label


def _overlap_probability(shape, patch, cube):
    """Exact chance that a uniformly placed patch touches the cube: per axis, the starts s
    with [s, s+p) meeting [a, b), out of all n - p + 1 starts; axes are independent."""
    prob = 1.0
    for n, p, (a, b) in zip(shape, patch, cube, strict=True):
        starts = np.arange(n - p + 1)
        prob *= np.mean((starts < b) & (starts + p > a))
    return prob


def test_shapes_dtypes_and_values_3d():
    image, label = _volume()
    ds = PatchDataset([image, image * 2], [label, label], (16, 12, 8), seed=3)
    assert len(ds) == 2
    img, lab = ds[1]
    assert img.shape == (1, 16, 12, 8) and img.dtype == torch.float32
    assert lab.shape == (16, 12, 8) and lab.dtype == torch.int64
    # The patch is a real window of volume 1: find it by its first voxel.
    hits = np.argwhere(image * 2 == img[0, 0, 0, 0].item())
    assert len(hits) == 1
    x, y, z = hits[0]
    np.testing.assert_array_equal(img[0].numpy(), (image * 2)[x : x + 16, y : y + 12, z : z + 8])
    np.testing.assert_array_equal(lab.numpy(), label[x : x + 16, y : y + 12, z : z + 8])


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_foreground_fraction(p):
    cube = ((30, 36), (2, 8), (20, 26))
    image, label = _volume(cube=cube)
    patch = (12, 12, 12)
    ds = PatchDataset([image], [label], patch, p_foreground=p, seed=0)
    n = 600
    hit = np.mean([ds[0][1].any().item() for _ in range(n)])
    if p == 1.0:
        assert hit == 1.0
    else:
        expected = _overlap_probability(image.shape, patch, cube)
        assert 0.02 < expected < 0.5
        assert abs(hit - expected) < 4 * np.sqrt(expected * (1 - expected) / n), (hit, expected)


def test_seeded_and_random_per_call():
    image, label = _volume()
    a = PatchDataset([image], [label], (8, 8, 8), seed=5)
    b = PatchDataset([image], [label], (8, 8, 8), seed=5)
    c = PatchDataset([image], [label], (8, 8, 8), seed=6)
    first = [a[0][0] for _ in range(5)]
    assert all(torch.equal(x, b[0][0]) for x in first)
    assert not all(torch.equal(first[0], x) for x in first[1:])
    assert not all(torch.equal(x, c[0][0]) for x in first)


def test_small_volume_is_padded():
    image = np.arange(5 * 6 * 4, dtype=np.float32).reshape(5, 6, 4) + 10.0
    label = np.ones((5, 6, 4), np.uint8)
    padded, offset = pad_to_shape(image, (8, 6, 9), value=-1.0)
    assert padded.shape == (8, 6, 9) and offset == (1, 0, 2)
    np.testing.assert_array_equal(padded[1:6, :, 2:6], image)
    img, lab = extract_patch(image, label, (8, 8, 8), np.random.default_rng(0), 0.5)
    assert img.shape == lab.shape == (8, 8, 8)
    assert img.min() == 10.0 and (img == 10.0).sum() > 8**3 - 5 * 6 * 4  # pad = image min
    assert lab.sum() == 5 * 6 * 4 and np.isin(img[lab == 1], image).all()
    ds = PatchDataset([image], [label], (8, 8, 8), p_foreground=1.0)
    assert ds[0][0].shape == (1, 8, 8, 8)


def test_2d_slices():
    cube = ((30, 36), (2, 8), (20, 26))
    image, label = _volume(cube=cube)
    ds = PatchDataset([image], [label], (16, 16), spatial_dims=2, p_foreground=1.0, seed=1)
    for _ in range(20):
        img, lab = ds[0]
        assert img.shape == (1, 16, 16) and lab.shape == (16, 16)
        assert lab.any()
        # An axial slice: its voxels occur together in one z-plane of the volume.
        x, y, z = np.argwhere(image == img[0, 0, 0].item())[0]
        np.testing.assert_array_equal(img[0].numpy(), image[x : x + 16, y : y + 16, z])
    bg = PatchDataset([image], [label], (16, 16), spatial_dims=2, p_foreground=0.0, seed=1)
    # Only slices 20..25 of 30 hold foreground, so uniform slices mostly miss it.
    assert np.mean([bg[0][1].any().item() for _ in range(200)]) < 0.3
    with pytest.raises(ValueError, match="spatial_dims=2"):
        PatchDataset([image], [label], (16, 16, 16), spatial_dims=2)


def test_one_patch_per_volume_in_a_loader_with_workers():
    image, label = _volume()
    ds = PatchDataset([image] * 4, [label] * 4, (8, 8, 8), seed=0)
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = [imgs for imgs, _ in loader] + [imgs for imgs, _ in loader]
    assert all(b.shape == (4, 1, 8, 8, 8) for b in batches)
    flat = torch.cat(batches).reshape(-1, 8**3)
    assert len({tuple(row[:4].tolist()) for row in flat}) > len(flat) // 2


def test_from_msd_on_phantoms(tmp_path):
    write_phantom_dataset(tmp_path, cases=3, sites=1, size=32, seed=2, progress=False)
    ds = PatchDataset.from_msd(MSDDataset(tmp_path), (16, 16, 16), indices=[0, 2], seed=0)
    assert len(ds) == 2
    img, lab = ds[1]
    assert img.shape == (1, 16, 16, 16) and 0.0 <= img.min() and img.max() <= 1.0  # windowed
    assert set(torch.unique(lab).tolist()) <= {0, 1}
