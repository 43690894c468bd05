"""What a DP run samples, and over what: decided once, before any step, from public values.

Under add/remove adjacency the neighbouring datasets have N and N+1 patients, and the
accountants assume that one mechanism runs on both. Everything the run releases must then
be a function of public constants, never of N: the Poisson rate q, the number of steps,
and the normaliser (the expected batch the clipped sum is divided by). Opacus derives all
three from N (q = 1 / len(loader), len(loader) steps an epoch, E[B] = int(N q)): measured
with a Linear(1000, 100) and zero gradients, the update's norm alone told N = 100 from
N = 101 in 200 of 200 trials (issue 23). :func:`plan_sampling` therefore records which of
them were declared; if any was derived from N, N is public and the epsilon is for
replace-one adjacency (dpseg.privacy.accountants).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from dpseg.privacy.data_loader import DPDataLoader
from dpseg.privacy.units import PatientIndex


@dataclass
class SamplingPlan:
    sample_rate: float  # q, per unit and step
    rate_declared: bool  # q (and with it the steps a pass) fixed without reading N
    expected_batch_size: int  # the normaliser: expected units a batch
    normaliser_declared: bool
    steps_per_epoch: int
    num_units: int
    unit: str  # "item", or the declared unit's name ("patient" unless the caller names it)
    sampling: str  # "poisson" or "shuffled"
    patients: PatientIndex | None = None
    notes: list[str] = field(default_factory=list)  # what was replaced, said at make_private

    @property
    def adjacency(self) -> str:
        if self.sampling == "poisson" and self.rate_declared and self.normaliser_declared:
            return "add/remove"
        return "replace-one"


def _patient_ids(loader: DataLoader, patient_ids: Sequence | None) -> Sequence | None:
    if patient_ids is not None:
        return patient_ids
    return getattr(loader.dataset, "patient_ids", None)


def check_unit_name(name) -> str:
    """``name`` if it can name a declared unit (one word, not "item", which means rows that
    declare no unit); ValueError saying what to give otherwise."""
    if not isinstance(name, str) or not name.isidentifier() or name == "item":
        raise ValueError(
            f'privacy_unit must be one word naming the declared unit ("patient", "case", '
            f'"subject"; not "item", which means undeclared rows), got {name!r}'
        )
    return name


def unit_name(dataset, privacy_unit: str | None) -> str:
    """What a declared unit is called in the ledger: ``privacy_unit``, else the dataset's
    ``privacy_unit`` attribute, else "patient". A name is only a name: the units are those
    patient_ids declare. It says honestly what they are (an MSD "case" that may be one of
    several scans of a subject is not a patient)."""
    name = privacy_unit if privacy_unit is not None else getattr(dataset, "privacy_unit", None)
    return "patient" if name is None else check_unit_name(name)


def _check_rate(sample_rate: float) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | float):
        raise TypeError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return float(sample_rate)


def _check_expected(expected: float) -> int:
    if isinstance(expected, bool) or not isinstance(expected, int | float) or expected <= 0:
        raise ValueError(
            f"expected_batch_size must be a number > 0 (the expected units a batch, the "
            f"normaliser), got {expected!r}"
        )
    return expected


def _replaced_sampler(loader: DataLoader) -> str | None:
    """What Poisson sampling replaces, when it is more than a plain (shuffled) pass."""
    if isinstance(loader, DPDataLoader):
        return None
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return f"the batch sampler {type(batch_sampler).__name__}"
    sampler = loader.sampler
    if not isinstance(sampler, SequentialSampler | RandomSampler):
        return f"the sampler {type(sampler).__name__}"
    return None


def _patients_per_batch_note(q: float, patients: PatientIndex, batch_size: int | None) -> list:
    """Opacus's q = 1 / len(loader) counts the loader's batches of items; sampling patients
    at that rate gives batches of about B / (items per patient) items, not B."""
    P, k = len(patients), patients.items_per_patient
    rows = q * P * k
    if batch_size is None or rows >= 0.5 * batch_size:
        return []
    fill = min(1.0, batch_size / (P * k))
    return [
        f"without sample_rate, q = 1 / len(loader) = {q:.4g} counts the loader's batches of "
        f"items, and Poisson sampling at q over {P} patients (each bringing {k} item"
        f"{'s' if k > 1 else ''}) gives batches of {q * P:.3g} patients, {rows:.3g} items "
        f"on average, not the loader's {batch_size}. Declare sample_rate and "
        "expected_batch_size (patients a batch), constants chosen in advance; here "
        f"sample_rate={fill:.4g} and expected_batch_size={fill * P:.4g} would fill a batch"
        + (" (at rate 1 every patient is in every batch: no amplification)" if fill == 1 else "")
    ]


def plan_sampling(
    loader: DataLoader,
    *,
    poisson_sampling: bool = True,
    sample_rate: float | None = None,
    expected_batch_size: float | None = None,
    loss_reduction: str = "mean",
    patient_ids: Sequence | None = None,
    items_per_patient: int = 1,
    privacy_unit: str | None = None,
) -> SamplingPlan:
    """Validates the loader and the declared constants; raises with what to change."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(loader).__name__}")
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"the data loader's dataset is an IterableDataset ({type(dataset).__name__}, as "
            "MONAI's GridPatchDataset and PatchIter are): it has no len() and cannot be "
            "indexed, and Poisson sampling must draw each patient independently. Use a "
            "map-style dataset of patients (monai.data.Dataset or CacheDataset with "
            "RandCropByPosNegLabeld(num_samples=k) gives k patches per patient, clipped as "
            "one), or a dataset of patches with make_private(..., patient_ids=...)."
        )
    if len(dataset) == 0:
        raise ValueError("the data loader's dataset is empty")
    if len(loader) == 0:
        raise ValueError(
            "the data loader yields no batches (a batch larger than the dataset with "
            "drop_last=True?)"
        )
    notes: list[str] = []
    ids = _patient_ids(loader, patient_ids)
    patients = getattr(loader, "patients", None) if isinstance(loader, DPDataLoader) else None
    if ids is not None:
        if not poisson_sampling:
            raise ValueError(
                "patient_ids need poisson_sampling=True: patients are sampled by Poisson "
                "sampling, each bringing items_per_patient of its items"
            )
        patients = PatientIndex(ids, len(dataset), items_per_patient)
    elif items_per_patient != 1:
        raise ValueError(
            f"items_per_patient={items_per_patient} needs patient_ids (the patient of each "
            "dataset item). An item that yields several samples (MONAI's num_samples=k) "
            "needs neither: its rows are clipped together already."
        )
    num_units = len(patients) if patients is not None else len(dataset)
    unit = unit_name(dataset, privacy_unit) if patients is not None else "item"
    if patients is None and privacy_unit is not None:
        raise ValueError(
            f"privacy_unit={privacy_unit!r} names the unit that patient_ids declare: give "
            "patient_ids too (or a dataset with a patient_ids attribute)"
        )

    if not poisson_sampling:
        q = 1 / len(loader)
        expected = max(1, int(len(dataset) * q))
        return SamplingPlan(
            q, False, expected, False, len(loader), len(dataset), unit, "shuffled", None, notes
        )
    rate_declared = True
    if sample_rate is not None:
        q = _check_rate(sample_rate)
        if isinstance(loader, DPDataLoader) and not math.isclose(loader.sample_rate, q):
            raise ValueError(
                f"sample_rate={q} but the DPDataLoader samples at {loader.sample_rate}"
            )
        steps = max(1, int(round(1 / q)))
    elif isinstance(loader, DPDataLoader):
        q, steps = loader.sample_rate, len(loader)  # a Poisson loader's own, declared rate
    else:
        q, steps, rate_declared = 1 / len(loader), len(loader), False
        if patients is not None:
            notes += _patients_per_batch_note(q, patients, loader.batch_size)
    if expected_batch_size is not None:
        expected, normaliser_declared = _check_expected(expected_batch_size), True
    else:
        # Under "sum" no normaliser is applied; under "mean", Opacus's int(q N) reads N.
        expected = max(1, int(num_units * q))
        normaliser_declared = loss_reduction == "sum"
    replaced = _replaced_sampler(loader)
    if replaced is not None:
        notes.append(
            f"{replaced} was replaced by Poisson sampling over {unit}s at q = {q:.4g}, which "
            "the accountant's amplification assumes; sampling weights (class balance) are "
            "lost. Balance with a per-voxel class weight in a loss reduced by a constant."
        )
    return SamplingPlan(
        q,
        rate_declared,
        expected,
        normaliser_declared,
        steps,
        num_units,
        unit,
        "poisson",
        patients,
        notes,
    )
