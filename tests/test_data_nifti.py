"""NIfTI loading: canonical orientation, the edge-case files in ../shared/data, bad files.

Oracles are independent of the loader: raw bytes parsed with struct/numpy, and the world
position of every voxel (original affine vs canonical affine) must be unchanged.
"""

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest

from dpseg.data import DataError, load_nifti, save_like

VOLUMES = "volumes"


def _assert_same_world(path, vol, channel=None, n=200):
    """Each voxel keeps its world position: original value at index i equals the canonical
    value at inv(canonical affine) @ original affine @ i."""
    img = nib.load(str(path))
    raw = np.asanyarray(img.dataobj)
    if channel is not None:
        raw = raw[..., channel]
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, s, n) for s in raw.shape[:3]], axis=1)
    to_canon = np.linalg.inv(vol.affine) @ img.affine
    mapped = (to_canon[:3, :3] @ idx.T + to_canon[:3, 3:]).T
    mapped_i = np.rint(mapped).astype(int)
    np.testing.assert_allclose(mapped, mapped_i, atol=1e-4)  # a pure permutation/flip
    np.testing.assert_array_equal(vol.array[tuple(mapped_i.T)], raw[tuple(idx.T)])


@pytest.mark.real_data
@pytest.mark.parametrize(
    "name, codes",
    [
        ("pulmonary_ct_cropped.nii.gz", ("L", "P", "S")),
        ("example_mr_sm.nii.gz", ("L", "P", "S")),
        ("BraTS2021_01646_flair.nii.gz", ("R", "A", "S")),
        ("anatomical.nii", ("L", "A", "S")),
    ],
)
def test_real_volumes_load_canonical(shared_data, name, codes):
    path = shared_data / VOLUMES / name
    vol = load_nifti(path)
    assert vol.original_axcodes == codes
    assert vol.axcodes == ("R", "A", "S")
    assert vol.array.dtype == np.float32 and vol.array.dtype.isnative
    assert np.all(np.diag(vol.affine)[:3] > 0)
    assert sorted(vol.shape) == sorted(vol.original_shape)
    _assert_same_world(path, vol)


@pytest.mark.real_data
def test_float32_volume_values_exact(shared_data):
    path = shared_data / VOLUMES / "BraTS2021_01646_flair.nii.gz"
    vol = load_nifti(path)  # RAS on disk: no reorientation, values bit-identical
    np.testing.assert_array_equal(vol.array, nib.load(str(path)).get_fdata(dtype=np.float32))
    assert vol.spacing == (1.5, 1.5, 1.5)


@pytest.mark.real_data
def test_big_endian_matches_byteswapped_raw_read(shared_data):
    path = shared_data / VOLUMES / "anatomical.nii"
    head = path.read_bytes()
    # Parse the header by hand: '>' works only if the file really is big-endian.
    assert struct.unpack(">i", head[:4])[0] == 348
    dims = struct.unpack(">8h", head[40:56])
    assert struct.unpack(">h", head[70:72])[0] == 4  # NIFTI_TYPE_INT16
    offset = int(struct.unpack(">f", head[108:112])[0])
    shape = dims[1 : 1 + dims[0]]
    raw = np.frombuffer(head, dtype=">i2", count=int(np.prod(shape)), offset=offset)
    native = raw.byteswap().view(raw.dtype.newbyteorder("=")).reshape(shape, order="F")
    vol = load_nifti(path)
    assert vol.array.dtype.isnative
    # LAS on disk -> RAS: only the first axis flips.
    np.testing.assert_array_equal(vol.array, native[::-1].astype(np.float32))


@pytest.mark.real_data
def test_4d_needs_a_channel(shared_data):
    path = shared_data / VOLUMES / "example4d.nii.gz"
    with pytest.raises(DataError, match="example4d.nii.gz") as err:
        load_nifti(path)
    assert "channel" in str(err.value)
    vol = load_nifti(path, channel=1)
    assert vol.array.ndim == 3 and sorted(vol.shape) == [24, 96, 128]
    _assert_same_world(path, vol, channel=1)
    with pytest.raises(DataError, match="out of range"):
        load_nifti(path, channel=2)


@pytest.mark.real_data
@pytest.mark.parametrize("case", ["liver_0", "liver_1"])
def test_save_like_round_trip_on_real_ct(shared_data, tmp_path, case):
    label_path = shared_data / "liver_ct_mini" / "labelsTr" / f"{case}.nii.gz"
    image = load_nifti(shared_data / "liver_ct_mini" / "imagesTr" / f"{case}.nii.gz")
    label = load_nifti(label_path, kind="label")
    out = save_like(label.array, image, tmp_path / "pred.nii.gz")
    written, original = nib.load(str(out)), nib.load(str(label_path))
    assert written.shape == original.shape
    np.testing.assert_array_equal(written.affine, original.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(original.affine)


def test_save_like_rejects_wrong_shape(tmp_path):
    ref = _write(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.int16))
    with pytest.raises(ValueError, match="shape"):
        save_like(np.zeros((4, 5, 5), np.uint8), load_nifti(ref), tmp_path / "b.nii.gz")


def test_labels_are_unsigned_integers(tmp_path):
    data = np.zeros((5, 5, 5), np.float32)
    data[1, 1, 1] = 2.0
    vol = load_nifti(_write(tmp_path / "l.nii.gz", data), kind="label")
    assert vol.array.dtype == np.uint8 and vol.array.max() == 2
    data[2, 2, 2] = 0.5
    with pytest.raises(DataError, match="non-integer"):
        load_nifti(_write(tmp_path / "bad.nii.gz", data), kind="label")


# ---------------------------------------------------------------- bad files
def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.nii.gz.*not found"):
        load_nifti(tmp_path / "nope.nii.gz")


def test_truncated_gz(tmp_path):
    rng = np.random.default_rng(0)
    good = _write(tmp_path / "good.nii.gz", rng.normal(size=(32, 32, 32)).astype(np.float32))
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.nii.gz.*truncated or corrupt"):
        load_nifti(bad)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "noise.nii.gz"
    bad.write_bytes(gzip.compress(np.random.default_rng(1).bytes(2000)))
    with pytest.raises(DataError, match="noise.nii.gz"):
        load_nifti(bad)
    notgz = tmp_path / "plain.nii.gz"
    notgz.write_bytes(b"hello")
    with pytest.raises(DataError, match="plain.nii.gz"):
        load_nifti(notgz)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad_value):
    data = np.zeros((6, 6, 6), np.float32)
    data[2, 3, 4] = bad_value
    path = _write(tmp_path / "nan.nii.gz", data)
    with pytest.raises(DataError, match="nan.nii.gz.*1 NaN or infinite"):
        load_nifti(path)


def test_synthetic_4d_and_singleton_channel(tmp_path):
    data = np.arange(4 * 5 * 6 * 2, dtype=np.int16).reshape(4, 5, 6, 2)
    path = _write(tmp_path / "four.nii.gz", data)
    with pytest.raises(DataError, match="four.nii.gz.*4-D"):
        load_nifti(path)
    np.testing.assert_array_equal(load_nifti(path, channel=0).array, data[..., 0])
    single = _write(tmp_path / "single.nii.gz", data[..., :1])
    assert load_nifti(single).shape == (4, 5, 6)
