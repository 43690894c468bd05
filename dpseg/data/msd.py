"""Medical Segmentation Decathlon datasets: dataset.json + imagesTr/ + labelsTr/, read as is.

The reader checks what can be checked from headers alone when it opens the dataset (files
exist, image and label share shape and affine), so a broken dataset fails before training
starts; voxel-level checks (NaN, undeclared label values) run when a case is loaded, since
reading every volume up front would cost minutes on the real Task03_Liver (131 CTs, 27 GB).
Call `validate()` to run them all eagerly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .nifti import DataError, Volume, load_nifti

__all__ = ["Case", "MSDDataset", "DEFAULT_SITE"]

DEFAULT_SITE = "default"  # site of entries without a "site" key (single-site datasets)
# Image and label affines written by different tools differ in the last float32 digits.
_AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class Case:
    """One patient: the privacy unit. Paths are absolute; nothing is loaded yet."""

    name: str
    site: str
    image_path: Path
    label_path: Path | None


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class MSDDataset:
    """The training cases of an MSD-layout folder, loaded lazily one patient at a time.

    label_map: optional {old value: new value}, e.g. {1: 1, 2: 1} merges liver and tumour
    into one foreground class; values it does not list keep their value. channel: which
    channel of 4-D (multi-modal) images to use. `load(i)` returns (image, label) Volumes in
    canonical orientation, the label already mapped.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        label_map: Mapping[int, int] | None = None,
        channel: int | None = None,
        check_headers: bool = True,
    ) -> None:
        self.root = Path(root)
        self.json_path = self.root / "dataset.json"
        self.channel = channel
        meta = self._read_json()
        self.name: str = str(meta.get("name", self.root.name))
        self.modality: dict[str, str] = {
            str(k): str(v) for k, v in meta.get("modality", {}).items()
        }
        self.labels: dict[int, str] = self._parse_labels(meta)
        self.label_map: dict[int, int] | None = (
            {int(k): int(v) for k, v in label_map.items()} if label_map else None
        )
        # A map entry for a class this dataset lacks is harmless (the liver+tumour map on a
        # liver-only set), so only the values actually present are checked, at load time.
        self.cases: list[Case] = self._parse_cases(meta)
        if check_headers:
            for case in self.cases:
                self._check_headers(case)

    # ------------------------------------------------------------------ parsing dataset.json
    def _read_json(self) -> dict:
        if not self.json_path.exists():
            raise DataError(
                f"{self.json_path}: not found; {self.root} is not a Medical Segmentation "
                "Decathlon folder. Point --data at the folder that holds dataset.json, "
                "imagesTr/ and labelsTr/ (or write one with `dpseg phantoms`)."
            )
        try:
            meta = json.loads(self.json_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(
                f"{self.json_path}: cannot be parsed as JSON ({exc}). Fix or regenerate it."
            ) from exc
        if not isinstance(meta, dict):
            raise DataError(f"{self.json_path}: must hold a JSON object with a 'training' list.")
        return meta

    def _parse_labels(self, meta: dict) -> dict[int, str]:
        raw = meta.get("labels")
        if not isinstance(raw, dict) or not raw:
            raise DataError(
                f"{self.json_path}: has no 'labels' object. Declare the label values, e.g. "
                '"labels": {"0": "background", "1": "liver"}.'
            )
        try:
            return {int(k): str(v) for k, v in raw.items()}
        except ValueError as exc:
            raise DataError(
                f'{self.json_path}: \'labels\' keys must be integers as strings ("0", "1"); '
                f"got {list(raw)}."
            ) from exc

    def _resolve(self, rel: object, index: int, key: str) -> Path:
        if not isinstance(rel, str) or not rel:
            raise DataError(
                f"{self.json_path}: training entry {index} has no '{key}' path. "
                'Each entry needs {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}.'
            )
        path = (self.root / rel).resolve()
        if not path.exists():
            raise DataError(
                f"{path}: listed as '{key}' of training entry {index} in {self.json_path} but "
                "the file does not exist. Restore the file or remove the entry from dataset.json."
            )
        return path

    def _parse_cases(self, meta: dict) -> list[Case]:
        entries = meta.get("training")
        if not isinstance(entries, list) or not entries:
            raise DataError(
                f"{self.json_path}: the dataset is empty (no entries in 'training'). "
                "List at least one {image, label} pair, or point --data at another folder."
            )
        cases = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):  # some MSD derivatives list bare image paths
                entry = {"image": entry}
            if not isinstance(entry, dict):
                raise DataError(f"{self.json_path}: training entry {i} is not an object.")
            image = self._resolve(entry.get("image"), i, "image")
            label = self._resolve(entry["label"], i, "label") if "label" in entry else None
            site = str(entry.get("site", DEFAULT_SITE))
            cases.append(Case(_case_name(image), site, image, label))
        return cases

    def _check_headers(self, case: Case) -> None:
        if case.label_path is None:
            return
        try:
            img, lab = nib.load(str(case.image_path)), nib.load(str(case.label_path))
        except Exception:
            # Unreadable headers are reported with full detail by load_nifti at load time.
            load_nifti(case.image_path, channel=self.channel)
            load_nifti(case.label_path, kind="label")
            raise
        ishape, lshape = img.shape[:3], lab.shape[:3]
        if ishape != lshape:
            raise DataError(
                f"{case.label_path}: label shape {lab.shape} does not match its image "
                f"{case.image_path.name} of shape {img.shape}. The mask must be on the image's "
                "voxel grid; resample it onto the image (nearest neighbour) or fix the pairing "
                f"in {self.json_path.name}."
            )
        if not np.allclose(img.affine, lab.affine, rtol=0, atol=_AFFINE_ATOL_MM):
            diff = float(np.abs(img.affine - lab.affine).max())
            raise DataError(
                f"{case.label_path}: label affine differs from that of its image "
                f"{case.image_path.name} by up to {diff:.4g} mm, so the mask does not lie on the "
                "image. Re-save the mask with the image's affine, or fix the pairing."
            )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    @property
    def sites(self) -> list[str]:
        """Distinct sites in order of first appearance."""
        return list(dict.fromkeys(c.site for c in self.cases))

    def indices_by_site(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {s: [] for s in self.sites}
        for i, c in enumerate(self.cases):
            out[c.site].append(i)
        return out

    @property
    def num_classes(self) -> int:
        """Classes after the label map (background included)."""
        values = set(self.labels)
        if self.label_map:
            values = {self.label_map.get(v, v) for v in values}
        return max(values) + 1

    def load_image(self, i: int) -> Volume:
        return load_nifti(self.cases[i].image_path, channel=self.channel)

    def load_label(self, i: int) -> Volume:
        case = self.cases[i]
        if case.label_path is None:
            raise DataError(f"{self.json_path}: case {case.name} has no label.")
        vol = load_nifti(case.label_path, kind="label")
        present = np.flatnonzero(np.bincount(vol.array.ravel()))
        undeclared = sorted(set(present.tolist()) - set(self.labels))
        if undeclared:
            raise DataError(
                f"{case.label_path}: holds label values {undeclared} that {self.json_path} does "
                f"not declare (declared: {sorted(self.labels)}). Add them to 'labels' or fix "
                "the mask."
            )
        if self.label_map:
            lut = np.arange(max(int(present.max()), max(self.label_map)) + 1, dtype=np.int64)
            for old, new in self.label_map.items():
                lut[old] = new
            vol.array = lut[vol.array].astype(np.uint8 if lut.max() <= 255 else np.int32)
        return vol

    def load(self, i: int) -> tuple[Volume, Volume]:
        """(image, label) of case i, canonical orientation, label mapped."""
        return self.load_image(i), self.load_label(i)

    def validate(self) -> None:
        """Load every case once so that voxel-level problems surface now (slow on big data)."""
        for i in range(len(self)):
            self.load_image(i)
            if self.cases[i].label_path is not None:
                self.load_label(i)
