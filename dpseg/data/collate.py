"""Collating items that hold several samples of one patient.

An item of a multi-sample dataset (k patches or slices of one patient's volume, as
``PatchDataset(samples_per_item=k)`` or MONAI's ``RandCropByPosNegLabeld(num_samples=k)``
make) is a list of k samples. :func:`flatten_collate` lays the lists out one sample a row,
item after item, as MONAI's ``list_data_collate`` does; the DP loader counts each item's
rows and clips them together as one patient (dpseg.privacy.units).
"""

from __future__ import annotations

from torch.utils.data import default_collate

__all__ = ["flatten_collate"]


def flatten_collate(batch):
    """``default_collate`` over the samples of the items: an item that is a list brings
    each of its elements as a row, any other item is one row."""
    rows = []
    for item in batch:
        if isinstance(item, list):
            rows.extend(item)
        else:
            rows.append(item)
    return default_collate(rows)
