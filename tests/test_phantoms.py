"""Phantom generator: determinism, anatomy (HU per tissue, non-convex liver), sites, speed."""

import json
import time

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull

from dpseg.data import MSDDataset, SiteParams, make_phantom, site_params, write_phantom_dataset
from dpseg.data import phantoms as ph


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", cases=3, sites=2, size=32, seed=7, progress=False)
    b = write_phantom_dataset(tmp_path / "b", cases=3, sites=2, size=32, seed=7, progress=False)
    c = write_phantom_dataset(tmp_path / "c", cases=3, sites=2, size=32, seed=8, progress=False)
    fa, fb, fc = _files(a.parent), _files(b.parent), _files(c.parent)
    assert len(fa) == 7 and fa == fb  # same bytes, gzip headers included
    assert fa.keys() == fc.keys()
    assert all(fa[k] != fc[k] for k in fa if k.parts[0] in ("imagesTr", "labelsTr"))


def _hull_deficit(mask):
    """Share of the voxels inside the convex hull of `mask` that are not in `mask`."""
    pts = np.argwhere(mask)
    facets = ConvexHull(pts).equations  # inside: normal . p + offset <= 0 for every facet
    lo, hi = pts.min(0), pts.max(0) + 1
    box = np.indices(hi - lo).reshape(3, -1).T + lo
    inside = (box @ facets[:, :3].T + facets[:, 3] <= 1e-9).all(axis=1)
    return 1.0 - mask[tuple(box[inside].T)].mean()


def test_liver_is_nonempty_and_not_convex():
    size = 64
    # Control: the grid points in the hull of a digitised convex body all lie in the body, so
    # a rasterised ellipsoid has no deficit at all; the phantom liver's is 14-22 %.
    idx = (np.indices((size,) * 3) - 32.0) / np.array([14.0, 11.0, 16.0])[:, None, None, None]
    ellipsoid = (idx**2).sum(0) <= 1.0
    control = _hull_deficit(ellipsoid)
    assert control == 0.0
    for seed in range(3):
        _, label = make_phantom(size, np.random.default_rng(seed), site_params(0, seed))
        assert 0.01 < label.mean() < 0.12  # the liver fills a few % of an abdominal scan
        deficit = _hull_deficit(label > 0)
        assert deficit > 0.1, (seed, deficit)


# Plausible HU (ranges from abdominal CT literature, generous for site offset/contrast).
HU_RANGES = {
    ph.AIR: (-1024, -950), ph.FAT: (-150, -50), ph.SOFT: (10, 80), ph.LUNG: (-900, -650),
    ph.LIVER: (40, 130), ph.SPLEEN: (30, 130), ph.MEDULLA: (10, 70), ph.CORTEX: (80, 260),
    ph.BONE: (400, 1100), ph.MARROW: (350, 700), ph.AORTA: (100, 300), ph.GAS: (-1024, -700),
}  # fmt: skip


@pytest.mark.parametrize("site", [0, 1, 2])
def test_tissue_hu_ranges(site):
    params = site_params(3, site)
    tissues = ph.phantom_tissues(64, np.random.default_rng([site, 11]), params)
    image, label = make_phantom(64, np.random.default_rng([site, 11]), params)
    np.testing.assert_array_equal(label, tissues == ph.LIVER)
    for organ, (lo, hi) in HU_RANGES.items():
        # Away from edges (blur) and with noise averaged out: the median of the eroded region;
        # the cortical shell and gas bubbles are a voxel or two thick, so they are not eroded.
        core = tissues == organ
        if organ not in (ph.BONE, ph.GAS):
            core = ndimage.binary_erosion(core, iterations=1)
        assert core.sum() > 5, organ
        # Bubbles are ~2 voxels wide, so blur lifts their median; their darkest voxel is gas.
        med = float(np.min(image[core]) if organ == ph.GAS else np.median(image[core]))
        assert lo <= med <= hi, (organ, med)
    # Contrast-enhanced kidney cortex is brighter than the medulla.
    cortex = np.median(image[tissues == ph.CORTEX])
    assert cortex > np.median(image[tissues == ph.MEDULLA]) + 30
    # Anatomy: liver on the patient's right (+x in RAS), spleen on the left, lungs on top,
    # spine posterior (-y).
    com = {o: ndimage.center_of_mass(tissues == o) for o in (ph.LIVER, ph.SPLEEN, ph.LUNG)}
    assert com[ph.LIVER][0] > 32 > com[ph.SPLEEN][0]
    assert com[ph.LUNG][2] > com[ph.LIVER][2]
    assert ndimage.center_of_mass(tissues == ph.MARROW)[1] < com[ph.LIVER][1]


def test_sites_differ_in_scanner_and_spacing_is_in_the_affine(tmp_path):
    meta_path = write_phantom_dataset(tmp_path, cases=6, sites=3, seed=1, progress=False)
    meta = json.loads(meta_path.read_text())
    assert meta["labels"] == {"0": "background", "1": "liver"}
    assert [e["site"] for e in meta["training"]] == ["site0", "site1", "site2"] * 2
    ds = MSDDataset(tmp_path)
    assert ds.sites == ["site0", "site1", "site2"]
    spacing = {}
    for i, case in enumerate(ds.cases):
        image, label = ds.load(i)
        assert image.shape == (64, 64, 64) and label.array.max() == 1
        assert image.axcodes == ("R", "A", "S")
        expected = site_params(1, int(case.site[-1])).spacing
        np.testing.assert_allclose(image.spacing, expected, rtol=1e-6)
        spacing.setdefault(case.site, image.spacing)
        assert spacing[case.site] == image.spacing
        # Stored as int16 HU, as scanners do; read back as float32.
        assert image.array.dtype == np.float32 and np.all(image.array == np.round(image.array))
    assert len(set(spacing.values())) == 3
    noise = {s: p["noise_sd"] for s, p in meta["sites"].items()}
    assert len(set(noise.values())) == 3


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path):
    from dpseg.data import DataError

    (tmp_path / "dataset.json").write_text('{"name": "Task03_Liver"}')
    with pytest.raises(DataError, match="dataset.json: already holds a dataset"):
        write_phantom_dataset(tmp_path, cases=1, sites=1, progress=False)
    assert json.loads((tmp_path / "dataset.json").read_text()) == {"name": "Task03_Liver"}
    with pytest.raises(ValueError, match="sites"):
        write_phantom_dataset(tmp_path / "x", cases=2, sites=3, progress=False)


def test_reference_site_params_are_sane():
    p = SiteParams()
    image, label = make_phantom(48, np.random.default_rng(0), p)
    assert image.shape == label.shape == (48, 48, 48) and image.dtype == np.float32
    assert -1024 <= image.min() and image.max() <= 3071


def test_speed_100_cases_64(tmp_path):
    start = time.perf_counter()
    write_phantom_dataset(tmp_path, cases=100, sites=4, size=64, seed=0, progress=False)
    seconds = time.perf_counter() - start
    print(f"\n100 phantoms of 64^3 written in {seconds:.2f} s")
    assert seconds < 60.0
    assert len(MSDDataset(tmp_path)) == 100


def test_an_existing_complete_folder_is_reused_and_writes_leave_no_temporaries(tmp_path):
    # Each Flower ClientApp loads the phantoms itself; rewriting files another process is
    # reading gave it an empty file. The same dataset is now left alone, and a new one is
    # written through a temporary file and a rename.
    meta = write_phantom_dataset(tmp_path, cases=2, sites=1, size=16, seed=3, progress=False)
    image = tmp_path / "imagesTr" / "phantom_0000.nii.gz"
    before = image.stat().st_mtime_ns, meta.stat().st_mtime_ns
    write_phantom_dataset(tmp_path, cases=2, sites=1, size=16, seed=3, progress=False)
    assert (image.stat().st_mtime_ns, meta.stat().st_mtime_ns) == before
    data = image.read_bytes()
    write_phantom_dataset(tmp_path, cases=2, sites=1, size=16, seed=4, progress=False)
    assert image.read_bytes() != data  # other parameters: written again
    image.unlink()
    write_phantom_dataset(tmp_path, cases=2, sites=1, size=16, seed=4, progress=False)
    assert image.is_file()  # a missing file: written again
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
