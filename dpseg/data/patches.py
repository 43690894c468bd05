"""Patch sampling with foreground oversampling: k patches of one patient per draw.

The privacy unit is the patient. `PatchDataset[i]` is patient i (it declares
``patient_ids``): ONE patch of volume i, or, with ``samples_per_item=k``, a list of k
patches drawn afresh, collated one patch a row by `dpseg.data.flatten_collate`. The DP
loader draws patients by Poisson sampling and clips each patient's rows as one unit
(their gradients averaged, then clipped to C: dpseg.privacy.units), so a patient moves the
update by at most C however many patches it brings. Several patches averaged before
clipping is augmentation multiplicity (De et al. 2022) with the patient as the example: it
lowers the variance of the patient's gradient at no privacy cost.

The liver fills ~3-10 % of an abdominal CT, so uniform patches are mostly background; centring
a patch on a random foreground voxel with probability p (nnU-Net uses 1/3) balances classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from tqdm import tqdm

from .msd import MSDDataset
from .preprocess import Preprocessing

__all__ = ["pad_to_shape", "sample_patch_start", "extract_patch", "PatchDataset"]


def pad_to_shape(
    array: np.ndarray, shape: Sequence[int], value: float = 0.0
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pad the leading len(shape) axes up to at least `shape`, evenly on both sides.

    Returns the padded array and the offset of the original voxel (0, 0, ...) in it, so that
    foreground coordinates can be shifted along.
    """
    before, pads = [], []
    for n, p in zip(array.shape, shape, strict=False):
        extra = max(0, int(p) - n)
        before.append(extra // 2)
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return array, tuple(before)
    pads += [(0, 0)] * (array.ndim - len(pads))
    return np.pad(array, pads, mode="constant", constant_values=value), tuple(before)


def sample_patch_start(
    shape: Sequence[int],
    patch: Sequence[int],
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
) -> tuple[int, ...]:
    """Corner of a patch inside a volume of `shape` (each shape >= patch).

    foreground: None for a uniform draw, or (K, D) voxel coordinates; then the patch is
    centred on one of them drawn uniformly, shifted as little as needed to stay inside.
    """
    hi = [int(n) - int(p) for n, p in zip(shape, patch, strict=True)]
    if min(hi) < 0:
        raise ValueError(f"patch {tuple(patch)} larger than volume {tuple(shape)}; pad first")
    if foreground is None or len(foreground) == 0:
        return tuple(int(rng.integers(0, h + 1)) for h in hi)
    centre = foreground[rng.integers(0, len(foreground))]
    return tuple(
        int(min(max(int(c) - p // 2, 0), h)) for c, p, h in zip(centre, patch, hi, strict=True)
    )


def extract_patch(
    image: np.ndarray,
    label: np.ndarray,
    patch: Sequence[int],
    rng: np.random.Generator,
    p_foreground: float = 0.33,
    foreground: np.ndarray | None = None,
    pad_value: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) patch of size `patch` from a 3-D volume (padded if too small).

    `foreground` caches np.argwhere(label > 0) across calls; pad_value defaults to the
    image minimum (air after CT windowing).
    """
    if pad_value is None:
        pad_value = float(image.min()) if image.size else 0.0
    image, offset = pad_to_shape(image, patch, pad_value)
    label, _ = pad_to_shape(label, patch, 0)
    use_fg = rng.random() < p_foreground
    fg = None
    if use_fg:
        fg = np.argwhere(label > 0) if foreground is None else foreground + np.asarray(offset)
    start = sample_patch_start(image.shape, patch, rng, fg)
    sl = tuple(slice(s, s + int(p)) for s, p in zip(start, patch, strict=True))
    return image[sl], label[sl]


class PatchDataset(Dataset):
    """Volumes in memory (canonical order, already normalised); item i is one patch of volume i.

    spatial_dims=3: image (1, *patch) float32, label (*patch) int64.
    spatial_dims=2: an axial (last-axis) slice, patch = (Px, Py); image (1, Px, Py).
    Patches are random per call, from a numpy Generator seeded by `seed`; in DataLoader
    workers the generator is re-seeded from (seed, torch's per-worker seed) so workers do not
    repeat each other's patches yet a seeded loader stays reproducible.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        patch_size: Sequence[int],
        *,
        p_foreground: float = 0.33,
        spatial_dims: int = 3,
        seed: int = 0,
        pad_value: float | None = None,
        samples_per_item: int = 1,
    ) -> None:
        if isinstance(samples_per_item, bool) or not isinstance(samples_per_item, int):
            raise TypeError(f"samples_per_item must be an int, got {samples_per_item!r}")
        if samples_per_item < 1:
            raise ValueError(f"samples_per_item must be >= 1, got {samples_per_item}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if spatial_dims not in (2, 3) or len(patch_size) != spatial_dims:
            raise ValueError(
                f"spatial_dims={spatial_dims} needs a patch of {spatial_dims} sizes, "
                f"got {tuple(patch_size)}"
            )
        if not 0.0 <= p_foreground <= 1.0:
            raise ValueError(f"p_foreground must be in [0, 1], got {p_foreground}")
        for i, (im, lb) in enumerate(zip(images, labels, strict=True)):
            if im.ndim != 3 or im.shape != lb.shape:
                raise ValueError(f"volume {i}: image {im.shape} and label {lb.shape} must be 3-D")
        self.images, self.labels = images, labels
        self.patch_size = tuple(int(p) for p in patch_size)
        self.p_foreground = float(p_foreground)
        self.spatial_dims = spatial_dims
        self.seed = int(seed)
        self.pad_value = pad_value
        self.samples_per_item = samples_per_item
        self._rng = np.random.default_rng(self.seed)
        self._rng_worker: int | None = None
        self._fg: dict[int, np.ndarray] = {}  # foreground coordinates, computed on first use
        self._pad: dict[int, float] = {}  # image minimum (air) unless pad_value is given

    @classmethod
    def from_msd(
        cls,
        dataset: MSDDataset,
        patch_size: Sequence[int],
        preprocessing: Preprocessing | None = None,
        indices: Sequence[int] | None = None,
        progress: bool = False,
        **kwargs,
    ) -> PatchDataset:
        """Load and preprocess cases `indices` (default all) of an MSD dataset into memory.

        Item j of the result is a patch of case indices[j], so Poisson sampling over its
        indices samples patients. kwargs go to PatchDataset (p_foreground, spatial_dims, seed).
        """
        prep = preprocessing or Preprocessing()
        indices = range(len(dataset)) if indices is None else indices
        images, labels = [], []
        for i in tqdm(indices, desc="loading", unit="case", disable=None if progress else True):
            img, lab, _ = prep.apply(*dataset.load(i))
            images.append(img)
            labels.append(lab)
        return cls(images, labels, patch_size, **kwargs)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def patient_ids(self) -> list[int]:
        """Item i is patient i: make_private reads this and samples patients."""
        return list(range(len(self.images)))

    def _generator(self) -> np.random.Generator:
        info = get_worker_info()
        if info is not None and self._rng_worker != info.id:
            self._rng = np.random.default_rng([self.seed, int(info.seed) % 2**63])
            self._rng_worker = info.id
        return self._rng

    def _foreground(self, i: int) -> np.ndarray:
        if i not in self._fg:
            self._fg[i] = np.argwhere(np.asarray(self.labels[i]) > 0)
        return self._fg[i]

    def _pad_value(self, i: int, image: np.ndarray) -> float:
        if self.pad_value is not None:
            return self.pad_value
        if i not in self._pad:
            self._pad[i] = float(image.min())
        return self._pad[i]

    def __getitem__(self, i: int):
        """(image, label) of one patch; a list of ``samples_per_item`` of them when > 1."""
        if self.samples_per_item == 1:
            return self._patch(i)
        return [self._patch(i) for _ in range(self.samples_per_item)]

    def _patch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self._generator()
        image, label = np.asarray(self.images[i]), np.asarray(self.labels[i])
        fg, pad = self._foreground(i), self._pad_value(i, image)
        if self.spatial_dims == 3:
            img, lab = extract_patch(image, label, self.patch_size, rng, self.p_foreground, fg, pad)
        else:
            # Pick the slice first (a foreground voxel's slice, or uniform), then a 2-D patch
            # inside it, so p_foreground keeps its meaning for slices.
            if len(fg) and rng.random() < self.p_foreground:
                z = int(fg[rng.integers(0, len(fg))][2])
                p_in_slice = 1.0
            else:
                z, p_in_slice = int(rng.integers(0, image.shape[2])), 0.0
            img, lab = extract_patch(
                image[:, :, z],
                label[:, :, z],
                self.patch_size,
                rng,
                p_in_slice,
                None,
                pad,
            )
        img_t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).unsqueeze(0)
        lab_t = torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64))
        return img_t, lab_t
