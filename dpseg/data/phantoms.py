"""Synthetic abdominal CT in MSD layout: the project's built-in, shareable training data.

Each case is an upper-abdomen phantom in RAS+ world millimetres (origin at the volume centre,
+x = patient's right, +y = anterior, +z = superior): a body of fat and soft tissue, a liver on
the right (a right and a left lobe, notched by the gallbladder, indented by the right kidney
and domed by the right lung, so it is NOT convex), spleen, two kidneys with enhanced cortex,
aorta, vertebrae, lung bases at the top and a few bowel gas pockets. Organs are painted as ids
into one map in order, later organs overriding earlier ones, then turned into HU by a lookup
table, blurred (the scanner's point spread) and given Gaussian noise.

Sites differ as scanners do: voxel spacing (so field of view and apparent organ size in voxels
differ; the affine records it), noise level, a calibration offset, contrast around soft
tissue and the strength of contrast enhancement. Every draw comes from
SeedSequence((seed, ...)), so a case depends only on (seed, case index, site) and not on the
order or number of cases written. Speed: shapes are rasterised only inside their bounding
boxes on an open coordinate grid; ~25 ms per 64^3 case on one CPU core, gzip included.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from .nifti import DataError
from .raster import AIR, Painter, rotation

__all__ = [
    "ORGAN_HU",
    "SiteParams",
    "make_phantom",
    "phantom_affine",
    "phantom_tissues",
    "site_params",
    "write_phantom_dataset",
]

# Tissue ids, painted in this order of precedence by make_phantom.
FAT, SOFT, LUNG, LIVER, SPLEEN, CORTEX, MEDULLA, BONE, MARROW, AORTA, BILE, GAS = range(1, 13)
# Unenhanced HU; CORTEX and AORTA get the site's contrast enhancement on top.
ORGAN_HU = {
    AIR: -1000.0, FAT: -100.0, SOFT: 40.0, LUNG: -800.0, LIVER: 60.0, SPLEEN: 50.0,
    CORTEX: 30.0, MEDULLA: 30.0, BONE: 900.0, MARROW: 450.0, AORTA: 40.0, BILE: 5.0,
    GAS: -900.0,
}  # fmt: skip
_ENHANCED = {CORTEX: 1.0, AORTA: 1.2, LIVER: 0.15, SPLEEN: 0.2}  # share of site enhancement
_REF_SIZE = 64  # spacings below are for 64^3; other sizes keep the same field of view


@dataclass(frozen=True)
class SiteParams:
    """One scanner: voxel spacing in mm (for a 64^3 grid), noise SD and offset in HU,
    contrast (gain on soft-tissue HU around 40), enhancement (HU added to enhanced cortex/aorta) and
    blur (Gaussian sigma in voxels, the reconstruction kernel)."""

    spacing: tuple[float, float, float] = (5.5, 5.5, 5.0)
    noise_sd: float = 12.0
    offset: float = 0.0
    contrast: float = 1.0
    enhancement: float = 120.0
    blur: float = 0.7


def site_params(seed: int, site: int) -> SiteParams:
    """Deterministic scanner parameters of `site` for a dataset seed."""
    r = np.random.default_rng([seed, 0, site])
    inplane = float(r.uniform(5.0, 6.2))
    return SiteParams(
        spacing=(inplane, inplane, float(r.choice([4.5, 5.0, 5.5, 6.0]))),
        noise_sd=float(r.uniform(6.0, 22.0)),
        offset=float(r.uniform(-15.0, 15.0)),
        contrast=float(r.uniform(0.9, 1.12)),
        enhancement=float(r.uniform(70.0, 170.0)),
        blur=float(r.uniform(0.5, 1.0)),
    )


def phantom_tissues(
    size: int, rng: np.random.Generator, site_params: SiteParams | None = None
) -> np.ndarray:
    """The tissue-id map (uint8, ids AIR..GAS of this module) of one phantom, RAS order.

    make_phantom draws this first from the same generator, so with equal generator states
    the two agree: its label is exactly phantom_tissues(...) == LIVER.
    """
    sp = site_params or SiteParams()
    spacing = tuple(s * _REF_SIZE / size for s in sp.spacing)
    p = Painter(size, spacing)  # type: ignore[arg-type]
    u = rng.uniform
    g = np.array([u(-10, 10), u(-10, 10), u(-12, 12)])  # whole-patient shift, mm
    s = u(0.88, 1.05)  # body habitus
    organs_in_body = (SOFT, LIVER, SPLEEN, CORTEX, MEDULLA, AORTA, BILE, GAS)

    def at(x, y, z, jitter=6.0):
        return g + np.array([x, y, z]) + rng.uniform(-jitter, jitter, 3)

    # Body: subcutaneous fat ring around soft tissue, elliptic cross-section, all slices.
    a, b, fat = 150 * s, 105 * s, u(10, 25)
    p.cylinder(FAT, g[:2] + [0, -5], (a, b))
    p.cylinder(SOFT, g[:2] + [0, -5], (a - fat, b - fat))

    # Liver: right lobe + left lobe across the midline, rotated together.
    k, rot = u(0.88, 1.12), rotation(u(-0.2, 0.2), u(-0.1, 0.1))
    p.ellipsoid(LIVER, at(65, 5, 25), np.array([72, 80, 85]) * k, rot, where=(SOFT,))
    p.ellipsoid(LIVER, at(0, 35, 22, 8), np.array([60, 38, 30]) * k, rot, where=(SOFT, LIVER))
    # Gallbladder notch on the inferior-anterior surface (bile replaces liver).
    p.ellipsoid(BILE, at(35, 55, -30), (15, 18, 30), rotation(u(-0.4, 0.4)), where=(LIVER, SOFT))

    # Spleen, kidneys (cortex shell, medulla core; the right one indents the liver).
    p.ellipsoid(SPLEEN, at(-85, -35, 25), np.array([30, 45, 55]) * u(0.8, 1.2),
                rotation(u(-0.4, 0.4)), where=(SOFT,))  # fmt: skip
    for side, z in ((1, -50), (-1, -40)):
        c, r = at(65 * side, -55, z), rotation(side * u(0.2, 0.5))
        semi = np.array([28, 22, 55]) * u(0.9, 1.1)
        p.ellipsoid(CORTEX, c, semi, r, where=(SOFT, LIVER))
        p.ellipsoid(MEDULLA, c, semi, r, where=(CORTEX,), inside=0.65)

    # Lung bases at the top; the right hemidiaphragm sits higher and shapes the liver dome.
    for side, apex in ((1, 75), (-1, 65)):
        c = at(75 * side, -5, apex)
        p.dome(LUNG, c[:2], (58, 78), c[2], u(35, 55), where=organs_in_body)

    # Aorta, and vertebrae: bodies with a cortical shell, 5 mm discs, a spinous process.
    n = size
    p.cylinder(AORTA, g[:2] + [-20, -35], (12, 12), where=(SOFT, LIVER, SPLEEN, LUNG))
    z = p.axes[2] - g[2] + u(0, 30)
    vertebra = np.mod(z, 30.0) < 25.0
    spine_c = g[:2] + [0, -65]
    p.cylinder(BONE, spine_c, (20, 17), vertebra, where=(SOFT,))
    p.cylinder(MARROW, spine_c, (16.5, 13.5), vertebra, where=(BONE,))
    p.cylinder(BONE, spine_c + [0, -35], (6, 14), vertebra, where=(SOFT,))
    for _ in range(4):  # bowel gas, anterior-left, below the liver
        p.ellipsoid(GAS, at(-40, 40, -60, 30), rng.uniform(8, 16, 3), where=(SOFT,))
    assert p.ids.shape == (n, n, n)
    return p.ids


def make_phantom(
    size: int, rng: np.random.Generator, site_params: SiteParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One abdominal CT phantom on a size^3 grid: (HU float32, liver label uint8), RAS order.

    The spacing of the grid is site_params.spacing * 64 / size (see `phantom_affine`).
    """
    sp = site_params or SiteParams()
    ids = phantom_tissues(size, rng, sp)

    # Tissue -> HU; per-case tissue variation, site enhancement, contrast and offset.
    lut = np.array([ORGAN_HU[i] for i in range(len(ORGAN_HU))], np.float32)
    lut[[LIVER, SPLEEN, SOFT, FAT]] += rng.normal(0, 5, 4).astype(np.float32)
    for organ, share in _ENHANCED.items():
        lut[organ] += share * sp.enhancement
    # CT is calibrated at water and air, so scanners differ in soft-tissue contrast (kernel,
    # kVp), not in where air or bone lie: the gain acts on soft tissues only.
    soft = [FAT, SOFT, LIVER, SPLEEN, CORTEX, MEDULLA, AORTA, BILE]
    lut[soft] = 40.0 + (lut[soft] - 40.0) * np.float32(sp.contrast)
    lut += np.float32(sp.offset)
    hu = lut[ids]
    if sp.blur > 0:
        hu = ndimage.gaussian_filter(hu, sp.blur, truncate=2.5)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(sp.noise_sd)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu.astype(np.float32, copy=False), (ids == LIVER).astype(np.uint8)


def phantom_affine(size: int, params: SiteParams) -> np.ndarray:
    """RAS affine of a phantom grid: voxel centres symmetric about world (0, 0, 0)."""
    spacing = np.asarray(params.spacing) * _REF_SIZE / size
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -(size - 1) / 2 * spacing
    return aff


def _write_gz(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    # gzip with mtime=0 so the same seed gives the same bytes; level 1 because phantoms are
    # noisy (level 6 saves ~3 % at 4x the time).
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    _write_atomically(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _is_complete(out: Path, meta: dict, cases: int, sites: int, size: int, seed: int) -> bool:
    same = meta.get("phantom") == {"seed": seed, "size": size, "sites": sites}
    entries = meta.get("training", [])
    return (
        same
        and len(entries) == cases
        and all((out / e[k]).is_file() for e in entries for k in ("image", "label"))
    )


def _write_atomically(path: Path, data: bytes) -> None:
    # Several processes may write the same folder at once (each Flower ClientApp of a
    # loopback deployment loads the phantoms): a reader must never see a half-written file.
    # The bytes are a function of the seed, so whichever writer lands last changes nothing.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_phantom_dataset(
    out: str | Path,
    cases: int,
    sites: int,
    size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write `cases` phantom CTs from `sites` scanners as an MSD folder; returns dataset.json.

    Case c comes from site c % sites. dataset.json lists each case with its "site" and the
    scanner parameters of every site; it is written last, so an interrupted run never looks
    complete. An existing folder is reused, but a dataset.json that dpseg did not write is
    never overwritten. Raises DataError for an unusable output folder, ValueError for bad
    arguments.
    """
    if cases < 1 or sites < 1 or sites > cases:
        raise ValueError(f"need 1 <= sites <= cases, got cases={cases}, sites={sites}")
    if size < 16:
        raise ValueError(f"size must be >= 16 voxels, got {size}")
    out = Path(out)
    meta_path = out / "dataset.json"
    if meta_path.exists():
        try:
            existing = json.loads(meta_path.read_text())
            ours = existing.get("name") == "dpseg-phantoms"
        except (OSError, ValueError):
            existing, ours = {}, False
        if ours and _is_complete(out, existing, cases, sites, size, seed):
            return meta_path  # the same phantoms: nothing to write
        if not ours:
            raise DataError(
                f"{meta_path}: already holds a dataset that dpseg phantoms did not write. "
                "Choose an empty or new --out folder; nothing was changed."
            )
    try:
        for sub in ("imagesTr", "labelsTr"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".dpseg_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(
            f"{out}: cannot write the phantom dataset there ({exc.strerror or exc}). "
            "Choose a writable --out folder."
        ) from exc

    params = [site_params(seed, k) for k in range(sites)]
    entries = []
    for c in tqdm(range(cases), desc="phantoms", unit="case", disable=None if progress else True):
        site = c % sites
        image, label = make_phantom(size, np.random.default_rng([seed, 1, c]), params[site])
        affine = phantom_affine(size, params[site])
        name = f"phantom_{c:04d}.nii.gz"
        hu = np.round(image).astype(np.int16)  # CT is stored as int16 HU, as scanners do
        _write_gz(hu, affine, out / "imagesTr" / name)
        _write_gz(label, affine, out / "labelsTr" / name)
        entries.append(
            {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "site": f"site{site}"}
        )
    meta = {
        "name": "dpseg-phantoms",
        "description": "Synthetic abdominal CT with liver masks from several simulated scanners",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver"},
        "numTraining": cases,
        "numTest": 0,
        "phantom": {"seed": seed, "size": size, "sites": sites},
        "sites": {f"site{k}": asdict(p) for k, p in enumerate(params)},
        "training": entries,
        "test": [],
    }
    _write_atomically(meta_path, json.dumps(meta, indent=1).encode())
    return meta_path
