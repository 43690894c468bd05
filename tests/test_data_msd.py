"""MSD reader: the real two-patient liver set, a multi-label MR mask, and broken datasets."""

import json

import nibabel as nib
import numpy as np
import pytest

from dpseg.data import DataError, MSDDataset

LIVER_VOXELS = {"liver_0": 41_692, "liver_1": 366_708}  # from ../shared/data/README.md


def _world_centroid(mask, affine):
    idx = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


@pytest.mark.real_data
def test_real_liver_cts(shared_data):
    ds = MSDDataset(shared_data / "liver_ct_mini")
    assert [c.name for c in ds.cases] == ["liver_0", "liver_1"]
    assert ds.sites == ["default"] and ds.num_classes == 2
    spacings = []
    for i, case in enumerate(ds.cases):
        image, label = ds.load(i)
        assert image.axcodes == label.axcodes == ("R", "A", "S")
        np.testing.assert_array_equal(image.affine, label.affine)
        assert image.shape == label.shape
        liver = label.array == 1
        assert int(liver.sum()) == LIVER_VOXELS[case.name]
        # Liver parenchyma: ~40-70 HU plain, up to ~130 HU in the portal venous phase.
        mean_hu = float(image.array[liver].mean())
        assert 0.0 < mean_hu < 150.0, mean_hu
        # In RAS+ world coordinates +x points to the patient's right, and the liver lies on
        # the right: its centroid has a larger x than the body's (soft tissue above -300 HU).
        body = image.array > -300
        liver_x = _world_centroid(liver, image.affine)[0]
        body_x = _world_centroid(body, image.affine)[0]
        assert liver_x > body_x + 30.0, (liver_x, body_x)
        # Independent of the loader: the original file's own (LAS or RAS) voxel index of
        # the liver centroid must map to the same world point.
        raw = np.asarray(nib.load(str(case.label_path)).dataobj) == 1
        raw_affine = nib.load(str(case.label_path)).affine
        np.testing.assert_allclose(
            _world_centroid(raw, raw_affine), _world_centroid(liver, label.affine), atol=1e-6
        )
        spacings.append(image.spacing)
    assert spacings[0] == (3.0, 3.0, 3.0)
    np.testing.assert_allclose(spacings[1], (0.9765625, 0.9765625, 2.0), rtol=1e-6)


@pytest.mark.real_data
def test_label_map_merges_classes(shared_data):
    ds = MSDDataset(shared_data / "liver_ct_mini", label_map={1: 3})
    assert ds.num_classes == 4
    _, label = ds.load(0)
    assert set(np.unique(label.array)) == {0, 3}
    # The liver+tumour map applies unchanged to a liver-only dataset.
    merged = MSDDataset(shared_data / "liver_ct_mini", label_map={1: 1, 2: 1})
    assert merged.num_classes == 2
    assert int(merged.load_label(0).array.sum()) == LIVER_VOXELS["liver_0"]


@pytest.mark.real_data
def test_multilabel_mr_declared_and_undeclared(shared_data, tmp_path):
    vol = shared_data / "volumes"
    seg = vol / "example_seg_mr.nii.gz"
    values = np.unique(np.asarray(nib.load(str(seg)).dataobj)).tolist()
    assert len(values) > 2
    entry = {"image": str(vol / "example_mr_sm.nii.gz"), "label": str(seg)}
    _dataset_json(tmp_path, [entry], labels={str(v): f"class{v}" for v in values})
    ds = MSDDataset(tmp_path)
    _, label = ds.load(0)
    assert np.unique(label.array).tolist() == values
    top = max(values)
    _dataset_json(tmp_path, [entry], labels={str(v): f"c{v}" for v in values if v != top})
    with pytest.raises(DataError, match=f"example_seg_mr.nii.gz: holds label values \\[{top}\\]"):
        MSDDataset(tmp_path).load_label(0)


# ---------------------------------------------------------------- synthetic datasets
def _dataset_json(root, training, labels=None):
    meta = {"name": "t", "labels": labels or {"0": "background", "1": "liver", "2": "tumour"}}
    meta["training"] = training
    (root / "dataset.json").write_text(json.dumps(meta))


def _case(root, name, shape=(8, 9, 10), label_values=(0, 1), affine=None, label_shape=None):
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(len(name))
    image = rng.normal(0, 100, shape).astype(np.int16)
    label = rng.choice(np.asarray(label_values, np.uint8), size=label_shape or shape)
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 3.0, 1.0])), root / "imagesTr" / name)
    lab_affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(label, lab_affine), root / "labelsTr" / name)
    return {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}


def test_tumour_label_and_label_map(tmp_path):
    entries = [_case(tmp_path, "a.nii.gz", label_values=(0, 1, 2))]
    entries[0]["site"] = "hospital_b"
    _dataset_json(tmp_path, entries)
    assert set(np.unique(MSDDataset(tmp_path).load_label(0).array)) == {0, 1, 2}
    ds = MSDDataset(tmp_path, label_map={1: 1, 2: 1})
    assert ds.num_classes == 2 and ds.sites == ["hospital_b"]
    raw = np.asarray(nib.load(str(tmp_path / "labelsTr" / "a.nii.gz")).dataobj)
    np.testing.assert_array_equal(ds.load_label(0).array, (raw > 0).astype(np.uint8))


def test_missing_file(tmp_path):
    entries = [_case(tmp_path, "a.nii.gz"), {"image": "./imagesTr/b.nii.gz", "label": "x"}]
    _dataset_json(tmp_path, entries)
    with pytest.raises(DataError, match="imagesTr/b.nii.gz.*does not exist") as err:
        MSDDataset(tmp_path)
    assert "dataset.json" in str(err.value)


def test_shape_mismatch(tmp_path):
    _dataset_json(tmp_path, [_case(tmp_path, "a.nii.gz", label_shape=(8, 9, 11))])
    with pytest.raises(DataError, match="labelsTr/a.nii.gz: label shape"):
        MSDDataset(tmp_path)


def test_affine_mismatch(tmp_path):
    shifted = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted[0, 3] = 1.0
    _dataset_json(tmp_path, [_case(tmp_path, "a.nii.gz", affine=shifted)])
    with pytest.raises(DataError, match="labelsTr/a.nii.gz: label affine differs .* by up to 1 mm"):
        MSDDataset(tmp_path)


def test_undeclared_label(tmp_path):
    _dataset_json(tmp_path, [_case(tmp_path, "a.nii.gz", label_values=(0, 1, 5))])
    ds = MSDDataset(tmp_path)  # headers are fine; values are checked on load
    with pytest.raises(DataError, match="labelsTr/a.nii.gz: holds label values \\[5\\]"):
        ds.validate()


@pytest.mark.parametrize("training", [[], None])
def test_empty_dataset(tmp_path, training):
    _dataset_json(tmp_path, training)
    with pytest.raises(DataError, match="dataset.json: the dataset is empty"):
        MSDDataset(tmp_path)


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="dataset.json: not found"):
        MSDDataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: cannot be parsed"):
        MSDDataset(tmp_path)


def test_nan_image_in_dataset(tmp_path):
    entry = _case(tmp_path, "a.nii.gz")
    data = np.zeros((8, 9, 10), np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "imagesTr/a.nii.gz")
    _dataset_json(tmp_path, [entry])
    with pytest.raises(DataError, match="imagesTr/a.nii.gz: holds 1 NaN"):
        MSDDataset(tmp_path).load(0)
