"""The privacy unit above the row: which rows of a batch are one patient.

DP-SGD bounds what one *unit* can move the update. A row is not always a unit: MONAI's
multi-sample transforms (``RandCropByPosNegLabeld(num_samples=k)`` collated by
``list_data_collate``) turn one patient's volume into k rows; a slice-wise dataset holds
many items of one patient. dpseg's unit is the patient whenever one is declared (else the
dataset item), and the engine clips per unit:

    g_u = (1/k_u) sum_{rows r of u} g_r          clipped to C as one
    update = (sum_u clip(g_u) + N(0, sigma^2 C^2)) / E[units]

so one unit moves the sum by at most C whatever its row count (augmentation multiplicity,
De et al. 2022, with the patient as the example). Coupling inside one unit's rows is
allowed; coupling across units is not (dpseg.privacy.loss_check).

:class:`RowUnits` is the map of one batch: rows are laid out unit by unit (the loader
builds them so), and the map holds the row count of each unit. The per-sample gradients
are reduced to per-unit sums where the capture records them
(:func:`RowUnits.reduce`), so everything downstream (norms, clip, noise, every backend,
BatchMemoryManager, torch.distributed) sees units and never rows. The transformer rules
(tokens, Swin's windows) reuse the same map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

UNIT_NAMES = ("patient", "item")


class UnitMapError(ValueError):
    """The rows of a batch cannot be attributed to its sampled units."""


@dataclass(frozen=True, eq=False)
class RowUnits:
    """Rows per unit of one batch, units in row order: unit u owns rows
    ``offsets[u] : offsets[u] + rows_per_unit[u]``."""

    rows_per_unit: tuple[int, ...]
    unit: str = "item"  # what a unit is: "patient" (declared) or "item" (a dataset item)

    @classmethod
    def identity(cls, rows: int, unit: str = "item") -> RowUnits:
        return cls((1,) * rows, unit)

    # Read for every parameter of every layer in the backward: computed once.
    @cached_property
    def rows(self) -> int:
        return sum(self.rows_per_unit)

    @property
    def num_units(self) -> int:
        return len(self.rows_per_unit)

    @cached_property
    def equal_rows(self) -> int | None:
        """k when every unit has k rows (the fast reshape path), else None."""
        counts = set(self.rows_per_unit)
        return counts.pop() if len(counts) == 1 else (1 if not counts else None)

    @cached_property
    def is_identity(self) -> bool:
        return all(k == 1 for k in self.rows_per_unit)

    def unit_of_row(self, device: torch.device | str = "cpu") -> torch.Tensor:
        index = torch.repeat_interleave(
            torch.arange(self.num_units), torch.tensor(self.rows_per_unit, dtype=torch.long)
        )
        return index.to(device)

    def reduce(self, g: torch.Tensor) -> torch.Tensor:
        """(rows, *shape) per-row gradients -> (units, *shape) per-unit sums."""
        if g.shape[0] != self.rows:
            raise UnitMapError(
                f"a per-sample gradient has {g.shape[0]} rows but the batch's unit map "
                f"explains {self.rows}"
            )
        if self.is_identity:
            return g
        k = self.equal_rows
        if k is not None:
            # Units of k consecutive rows: a view and one reduction, no index.
            return g.reshape(self.num_units, k, *g.shape[1:]).sum(1)
        out = g.new_zeros((self.num_units, *g.shape[1:]))
        return out.index_add_(0, self.unit_of_row(g.device), g)

    def row_scale(self, loss_reduction: str) -> torch.Tensor:
        """(units,) float64: what turns a unit's sum of rows *as autograd handed them over*
        into the unit's gradient, the mean of its rows' per-sample gradients. With
        loss_reduction="mean" autograd divides each row by the batch's row count R, so the
        factor is R / k_u; with "sum", 1 / k_u."""
        counts = torch.tensor(self.rows_per_unit, dtype=torch.float64)
        rows = float(self.rows) if loss_reduction == "mean" else 1.0
        return rows / counts if counts.numel() else counts


class UnitFeed:
    """Hands the unit map of the batch a DP loader yielded last to the forward pass that
    consumes it (the loader and the private model share one feed)."""

    def __init__(self, unit: str = "item"):
        self.unit = unit
        self.current: RowUnits | None = None

    def for_forward(self, rows: int | None) -> RowUnits | None:
        """The map for a forward pass over ``rows`` rows.

        The loader's last batch when its row count matches. A batch the loader did not
        yield (a hand-made batch, a validation pass with grad on) is one unit per row when
        that is what the loader's units are; where they are not (declared patients, or
        items of several rows), the rows cannot be attributed and the pass is refused."""
        if rows is None:
            return None
        current = self.current
        if current is not None and current.rows == rows:
            return current
        multi_row = current is not None and not current.is_identity
        if self.unit == "item" and not multi_row:
            return RowUnits.identity(rows, self.unit)
        last = (
            f"the loader's last batch had {current.rows} rows in {current.num_units} {self.unit}s"
            if current is not None
            else "the loader has yielded no batch yet"
        )
        raise UnitMapError(
            f"a forward pass over {rows} rows, but {last}: dpseg cannot tell which rows "
            f"belong to which {self.unit}, and clipping rows apart would let one {self.unit} "
            "move the update by more than C. Train on the batches the loader make_private "
            "returned, unchanged in their row count."
        )


def first_leaf(batch) -> torch.Tensor | None:
    """The first tensor with a leading batch dimension in a collated batch (depth first)."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() > 0 else None
    if isinstance(batch, dict):
        values = batch.values()
    elif isinstance(batch, list | tuple):
        values = batch
    else:
        return None
    for value in values:
        found = first_leaf(value)
        if found is not None:
            return found
    return None


def rows_of(batch) -> int | None:
    """Leading size of the first tensor in a collated batch, or None."""
    leaf = first_leaf(batch)
    return None if leaf is None else leaf.shape[0]


def rows_per_item(items: Sequence, batch, collate_fn) -> list[int]:
    """How many rows of the collated ``batch`` each of ``items`` became.

    An item that is a list is a multi-sample item under MONAI's ``list_data_collate``
    convention (one row per element), and may be one row under ``default_collate`` (a list
    of fields); whenever the batch has more rows than items, each item is collated alone,
    its rows counted, and the batch checked to hold them item after item (the unit map
    assumes that layout). Otherwise an item is one row, which the batch's row count must
    confirm; the collate must keep the items' order."""
    leaf = first_leaf(batch)
    if leaf is None:
        raise UnitMapError(
            "the collated batch holds no tensor with a leading batch dimension, so dpseg "
            "cannot count its rows; collate to tensors whose first dimension is the batch"
        )
    total = leaf.shape[0]
    if not any(isinstance(item, list) for item in items) and total == len(items):
        return [1] * len(items)
    if all(isinstance(item, list) for item in items):
        counts = [len(item) for item in items]
        if sum(counts) == total and _rows_are_the_samples(leaf, items):
            return counts  # the list convention, checked row by row without re-collating
    alone = [first_leaf(collate_fn([item])) for item in items]
    counts = [0 if a is None else a.shape[0] for a in alone]
    laid_out = sum(counts) == total and torch.equal(
        leaf, torch.cat([a for a in alone if a is not None]) if any(counts) else leaf
    )
    if not laid_out:
        raise UnitMapError(
            f"the batch has {total} rows but its {len(items)} items, collated one by one, "
            f"give {counts} rows{' in another order' if sum(counts) == total else ''}: dpseg "
            "cannot tell which rows came from which item. Return one row per item, or a "
            "list of samples per item collated by monai.data.list_data_collate / "
            "dpseg.data.flatten_collate; for a dataset whose items are slices or patches "
            "of patients, declare them with make_private(..., patient_ids=...)."
        )
    return counts


def _sample_leaf(sample):
    """A sample's first tensor (or array) field, depth first."""
    if isinstance(sample, torch.Tensor):
        return sample
    if hasattr(sample, "__array__") and not isinstance(sample, list | tuple | dict):
        return torch.as_tensor(sample)
    values = sample.values() if isinstance(sample, dict) else sample
    if isinstance(values, list | tuple) or isinstance(sample, dict):
        for value in values:
            found = _sample_leaf(value)
            if found is not None:
                return found
    return None


def _rows_are_the_samples(leaf: torch.Tensor, items) -> bool:
    row = 0
    for item in items:
        for sample in item:
            value = _sample_leaf(sample)
            if value is None or not torch.equal(leaf[row], value.to(leaf.dtype)):
                return False
            row += 1
    return True


class PatientIndex:
    """Items grouped by declared patient: Poisson sampling runs over patients, and each
    sampled patient brings ``items_per_patient`` of its items (k is public, fixed before
    seeing the data; drawn afresh each step, without replacement, or with replacement for a
    patient with fewer than k items)."""

    def __init__(self, patient_ids: Sequence, num_items: int, items_per_patient: int = 1):
        if isinstance(items_per_patient, bool) or not isinstance(items_per_patient, int):
            raise TypeError(f"items_per_patient must be an int, got {items_per_patient!r}")
        if items_per_patient < 1:
            raise ValueError(f"items_per_patient must be >= 1, got {items_per_patient}")
        ids = list(patient_ids)
        if len(ids) != num_items:
            raise ValueError(
                f"patient_ids has {len(ids)} entries for a dataset of {num_items} items; give "
                "the patient of every item, in item order"
            )
        if num_items == 0:
            raise ValueError("the dataset is empty")
        order: dict = {}
        for item, pid in enumerate(ids):
            try:
                order.setdefault(pid, []).append(item)
            except TypeError:
                raise TypeError(
                    f"patient id {pid!r} of item {item} is not hashable; use a str or int"
                ) from None
        self.items: list[list[int]] = list(order.values())
        self.items_per_patient = items_per_patient

    def __len__(self) -> int:
        return len(self.items)

    def draw(self, patient: int, generator: torch.Generator | None, secure: bool) -> list[int]:
        """k item indices of ``patient``, fresh randomness each call."""
        own, k = self.items[patient], self.items_per_patient
        n = len(own)
        if n == 1 and k == 1:
            return list(own)
        if secure:
            import random

            rng = random.SystemRandom()
            picks = rng.sample(range(n), k) if n >= k else [rng.randrange(n) for _ in range(k)]
        elif n >= k:
            picks = torch.randperm(n, generator=generator)[:k].tolist()
        else:
            picks = torch.randint(n, (k,), generator=generator).tolist()
        return [own[i] for i in picks]


__all__ = [
    "PatientIndex",
    "RowUnits",
    "UnitFeed",
    "UnitMapError",
    "first_leaf",
    "rows_of",
    "rows_per_item",
]
