"""Data layer: NIfTI I/O in canonical orientation, MSD datasets, preprocessing, patches,
and the synthetic phantom generator that is the project's built-in data."""

from .collate import flatten_collate
from .msd import Case, MSDDataset
from .nifti import DataError, Volume, load_nifti, save_like
from .patches import PatchDataset, extract_patch, pad_to_shape, sample_patch_start
from .phantoms import SiteParams, make_phantom, site_params, write_phantom_dataset
from .preprocess import (
    Preprocessing,
    normalize_percentile,
    resample_to_shape,
    resample_to_spacing,
    resampled_affine,
    window,
    zscore,
)

__all__ = [
    "Case",
    "DataError",
    "MSDDataset",
    "PatchDataset",
    "Preprocessing",
    "SiteParams",
    "Volume",
    "extract_patch",
    "flatten_collate",
    "load_nifti",
    "make_phantom",
    "normalize_percentile",
    "pad_to_shape",
    "resample_to_shape",
    "resample_to_spacing",
    "resampled_affine",
    "sample_patch_start",
    "save_like",
    "site_params",
    "window",
    "write_phantom_dataset",
    "zscore",
]
