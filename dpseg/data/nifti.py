"""NIfTI in and out: every volume in one canonical orientation (RAS+), and back again.

Sites store scans in whatever orientation their scanner or converter chose (LAS from DICOM
converters, LPS from ITK, RAS from nibabel). A model trained on a mix of them sees mirrored
anatomy unless all volumes are brought to one voxel-axis order first, so `load_nifti` turns
each volume to RAS+ (voxel axes pointing to patient Right, Anterior, Superior: the liver has
the larger world x) by permuting and flipping axes only, never by resampling. It keeps the
original affine, shape and axis codes so `save_like` can undo exactly that permutation and
write a prediction on the input's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

__all__ = ["DataError", "Volume", "load_nifti", "save_like", "CANONICAL_AXCODES"]

CANONICAL_AXCODES: tuple[str, str, str] = ("R", "A", "S")


class DataError(Exception):
    """Input data the project cannot use; the message names the file and what to change.

    The CLI turns it into a one-paragraph message and exit code 2, without a traceback.
    """


@dataclass
class Volume:
    """One 3-D volume in canonical (RAS+) voxel order, with what is needed to write back.

    `array` is float32 for images and uint8 (int32 when values exceed 255) for labels;
    `affine` maps canonical voxel indices to world mm. The `original_*` fields describe the
    file as stored, for `save_like`.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    original_axcodes: tuple[str, ...]
    original_header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def axcodes(self) -> tuple[str, ...]:
        return tuple(nib.aff2axcodes(self.affine))


def _fail(path: Path, what: str, change: str) -> DataError:
    return DataError(f"{path}: {what}. {change}")


def _read(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Open a NIfTI and read its voxels, turning every low-level failure into a DataError."""
    if not path.exists():
        raise _fail(
            path, "file not found", "Check the path (and, for a dataset, its dataset.json entry)."
        )
    try:
        img = nib.load(str(path))
    except Exception as exc:  # ImageFileError, gzip/zlib errors, bad header fields ...
        raise _fail(
            path,
            f"not a readable NIfTI file ({type(exc).__name__}: {exc})",
            "Re-export it as .nii or .nii.gz, or remove it from the dataset.",
        ) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise _fail(path, f"is a {type(img).__name__}, not NIfTI", "Convert it to .nii.gz first.")
    try:
        # Header reads are lazy; a truncated .nii.gz only fails here, when the voxels are read.
        # np.asanyarray applies scl_slope/scl_inter and handles big-endian files.
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError on short data
        raise _fail(
            path,
            f"the voxel data cannot be read; the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc})",
            "Copy or download it again, or remove it from the dataset.",
        ) from exc
    return img, data


def _to_3d(path: Path, data: np.ndarray, channel: int | None) -> np.ndarray:
    # Trailing singleton axes (x, y, z, 1) are common in exported masks; they are 3-D.
    while data.ndim > 3 and data.shape[-1] == 1 and channel is None:
        data = data[..., 0]
    if data.ndim == 3:
        if channel not in (None, 0):
            raise _fail(path, f"is 3-D but channel={channel} was asked for", "Leave channel unset.")
        return data
    if data.ndim == 4:
        if channel is None:
            raise _fail(
                path,
                f"is a 4-D series of shape {data.shape}; dpseg segments 3-D volumes",
                f"Choose one of its {data.shape[3]} channels with channel=0..{data.shape[3] - 1} "
                "(--channel on the command line) or split the file.",
            )
        if not -data.shape[3] <= channel < data.shape[3]:
            raise _fail(
                path,
                f"has {data.shape[3]} channels, channel={channel} is out of range",
                f"Choose channel=0..{data.shape[3] - 1}.",
            )
        return data[..., channel]
    raise _fail(
        path, f"has {data.ndim} dimensions {data.shape}", "dpseg needs a 3-D (or 4-D) volume."
    )


def _as_labels(path: Path, data: np.ndarray) -> np.ndarray:
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise _fail(
                path,
                "is used as a label map but holds non-integer or non-finite values",
                "Labels must be whole numbers 0, 1, 2, ...; store the mask as an integer type.",
            )
    if data.size and data.min() < 0:
        raise _fail(
            path,
            f"holds a negative label value {int(data.min())}",
            "Labels must be 0 (background) or positive class numbers.",
        )
    top = int(data.max()) if data.size else 0
    return data.astype(np.uint8 if top <= 255 else np.int32)


def load_nifti(
    path: str | Path,
    *,
    kind: Literal["image", "label"] = "image",
    channel: int | None = None,
) -> Volume:
    """Load a 3-D NIfTI volume in RAS+ voxel order.

    kind="image" gives float32 intensities (scaling applied) and rejects NaN/inf voxels;
    kind="label" gives unsigned integer labels. A 4-D file needs `channel=`; big-endian,
    scaled and any-orientation files are handled. Raises DataError naming the file.
    """
    path = Path(path)
    img, data = _read(path)
    data = _to_3d(path, data, channel)
    if kind == "image":
        data = np.asarray(data, dtype=np.float32)  # also makes big-endian data native
        if not np.isfinite(data).all():
            n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            raise _fail(
                path,
                f"holds {n_bad} NaN or infinite voxels",
                "Replace them (e.g. with the background value, -1024 HU for CT) before use.",
            )
    elif kind == "label":
        data = _as_labels(path, data)
    else:
        raise ValueError(f"kind must be 'image' or 'label', not {kind!r}")

    affine = np.asarray(img.affine, dtype=np.float64)
    shape3 = tuple(int(s) for s in data.shape)
    # Permute/flip only: io_orientation picks the closest axis for oblique affines too.
    transform = ornt.ornt_transform(
        ornt.io_orientation(affine), ornt.axcodes2ornt(CANONICAL_AXCODES)
    )
    canonical = np.ascontiguousarray(ornt.apply_orientation(data, transform))
    canonical_affine = affine @ ornt.inv_ornt_aff(transform, shape3)
    return Volume(
        array=canonical,
        affine=canonical_affine,
        path=path,
        original_affine=affine,
        original_shape=shape3,  # type: ignore[arg-type]
        original_axcodes=tuple(nib.aff2axcodes(affine)),
        original_header=img.header.copy(),
    )


def save_like(mask: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write `mask` (canonical order, shape of `reference.array`) on the reference's own grid.

    The file gets the reference file's shape, affine and orientation, so it overlays the input
    image in any viewer. Integer masks are stored as uint8 (int16 above 255 classes).
    """
    path = Path(path)
    mask = np.asarray(mask)
    if mask.shape != reference.array.shape:
        raise ValueError(
            f"mask shape {mask.shape} does not match the reference volume's canonical shape "
            f"{reference.array.shape}; resample the prediction back to it before saving."
        )
    canonical_ornt = ornt.axcodes2ornt(CANONICAL_AXCODES)
    back = ornt.ornt_transform(canonical_ornt, ornt.io_orientation(reference.original_affine))
    data = np.ascontiguousarray(ornt.apply_orientation(mask, back))
    assert data.shape == tuple(reference.original_shape), (data.shape, reference.original_shape)
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        data = data.astype(np.uint8 if data.size == 0 or data.max() <= 255 else np.int16)
    else:
        data = data.astype(np.float32)

    header = reference.original_header.copy() if reference.original_header is not None else None
    img = nib.Nifti1Image(data, reference.original_affine, header=header)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)  # the reference's CT rescale must not touch labels
    # Keep both qform and sform pointing at the same grid so every reader agrees.
    img.set_sform(reference.original_affine, code=int(img.header["sform_code"]) or 1)
    img.set_qform(reference.original_affine, code=int(img.header["qform_code"]) or 1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
    except OSError as exc:
        raise _fail(
            path, f"cannot be written ({exc.strerror or exc})", "Choose a writable output folder."
        ) from exc
    return path
