"""Poisson sampling over privacy units, and loaders that know which rows are which unit.

Each step takes every unit independently with probability q: the sampling the RDP/PRV
accountants assume (amplification by subsampling); a fixed-size shuffled batch would not
match the epsilon they report. A unit is a dataset item, or a declared patient
(:class:`dpseg.privacy.units.PatientIndex`): then each sampled patient brings k of its
items, drawn afresh. Batches vary in size and may be empty: an empty batch is collated as
zero-size tensors shaped like one example, and the DP step still adds noise for it.

Which rows of a collated batch belong to which unit travels beside the batch: the batch
sampler logs, per batch it yields, how many items each unit brought (``unit_log``); the
collate counts how many rows each item became (MONAI's multi-sample items become several);
the loader joins the two when the batch arrives and hands the map to the private model
through the shared :class:`dpseg.privacy.units.UnitFeed`. The log is read in the order the
batches arrive, which is the order the sampler yielded them, so workers that prefetch
cannot shift a map onto the wrong batch.
"""

from __future__ import annotations

import os
from collections import deque

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.pin_memory import pin_memory as _pin_memory
from torch.utils.data.dataloader import default_collate

from dpseg.privacy.units import PatientIndex, RowUnits, UnitFeed, rows_per_item


class PoissonBatchSampler(Sampler[list[int]]):
    """``steps`` batches, each a Poisson sample at rate q of ``num_samples`` units; with
    ``patients``, the units are its patients and each brings its k items."""

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator | None = None,
        secure: bool = False,
        patients: PatientIndex | None = None,
    ):
        if num_samples <= 0:
            raise ValueError("Poisson sampling needs a non-empty dataset")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if patients is not None and len(patients) != num_samples:
            raise ValueError(f"{len(patients)} patients declared, sampling over {num_samples}")
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps
        self.generator, self.secure, self.patients = generator, secure, patients
        # Items per unit of every batch yielded and not yet handed over (see module doc).
        self.unit_log: deque[list[int]] = deque()

    def _uniform(self) -> torch.Tensor:
        if self.secure:  # OS entropy, not a seeded generator an attacker could replay
            words = np.frombuffer(os.urandom(8 * self.num_samples), dtype=np.uint64)
            return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * 2.0**-53)
        return torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64)

    def _mine(self) -> torch.Tensor | None:
        return None  # every unit; a rank's shard under torch.distributed

    def _batch(self, mine: torch.Tensor | None) -> list[int]:
        taken = self._uniform() < self.sample_rate
        if mine is not None:
            taken &= mine
        units = taken.nonzero().flatten().tolist()
        if self.patients is None:
            self.unit_log.append([1] * len(units))
            return units
        items, sizes = [], []
        for u in units:
            picks = self.patients.draw(u, self.generator, self.secure)
            items += picks
            sizes.append(len(picks))
        self.unit_log.append(sizes)
        return items

    def __iter__(self):
        mine = self._mine()
        for _ in range(self.steps):
            yield self._batch(mine)

    def __len__(self) -> int:
        return self.steps


class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """Rank ``rank``'s share of one global Poisson draw over ``num_samples`` units: every
    unit (and so all of a patient's items) lives on one rank."""

    def __init__(
        self,
        num_samples,
        sample_rate,
        steps,
        rank,
        world_size,
        generator=None,
        secure=False,
        patients=None,
    ):
        super().__init__(num_samples, sample_rate, steps, generator, secure, patients)
        self.rank, self.world_size = rank, world_size

    def _mine(self) -> torch.Tensor:
        # Every rank draws all N uniforms (the same ones from a shared seed), so the split of
        # one global draw, not W independent draws over overlapping data.
        return torch.arange(self.num_samples) % self.world_size == self.rank


def _empty_like_example(example):
    if isinstance(example, torch.Tensor):
        return example.new_empty((0, *example.shape))
    if isinstance(example, np.ndarray):
        return torch.empty((0, *example.shape), dtype=torch.from_numpy(example).dtype)
    if isinstance(example, bool | int | float):
        return torch.empty(0, dtype=torch.as_tensor(example).dtype)
    if isinstance(example, list) and example and isinstance(example[0], dict | tuple):
        return _empty_like_example(example[0])  # a multi-sample item: one sample's shape
    if isinstance(example, tuple | list):
        return type(example)(_empty_like_example(e) for e in example)
    if isinstance(example, dict):
        return {k: _empty_like_example(v) for k, v in example.items()}
    raise TypeError(f"cannot build an empty batch for an example of type {type(example)}")


class Collated:
    """A collated batch and the rows each of its items became, on its way from the collate
    (maybe in a worker) to the loader's iterator."""

    def __init__(self, batch, rows: list[int]):
        self.batch, self.rows = batch, rows

    def pin_memory(self):
        return Collated(_pin_memory(self.batch), self.rows)

    def units(self, items_per_unit: list[int] | None, unit: str) -> RowUnits:
        if items_per_unit is None:  # a sampler without units: each item is one
            return RowUnits(tuple(self.rows), unit)
        if sum(items_per_unit) != len(self.rows):
            raise RuntimeError(
                f"the sampler sent {sum(items_per_unit)} items, the collate got "
                f"{len(self.rows)}; the loader's batches are out of step with its sampler"
            )
        per_unit, start = [], 0
        for n in items_per_unit:
            per_unit.append(sum(self.rows[start : start + n]))
            start += n
        return RowUnits(tuple(per_unit), unit)


class UnitCollate:
    """The user's collate, plus the rows per item (and an empty batch shaped like one
    example: a Poisson batch may be empty)."""

    def __init__(self, dataset: Dataset, collate_fn):
        self.dataset, self.collate_fn, self._empty = dataset, collate_fn, None

    def __call__(self, items) -> Collated:
        if len(items) == 0:
            if self._empty is None:
                self._empty = _empty_like_example(self.dataset[0])
            return Collated(self._empty, [])
        batch = self.collate_fn(items)
        return Collated(batch, rows_per_item(items, batch, self.collate_fn))


class UnitTrackingLoader(DataLoader):
    """A DataLoader whose collate is a :class:`UnitCollate`: each batch's unit map goes to
    ``unit_feed`` as the batch is handed over."""

    unit_feed: UnitFeed

    def __iter__(self):
        log = getattr(self.batch_sampler, "unit_log", None)
        if log is not None:
            log.clear()  # entries of an abandoned earlier pass
        # The DataLoader's iterator is made now, as iter(DataLoader) makes it (it draws its
        # base seed from the loader's generator): a lazily made one would draw it after
        # whatever reseeds the generator between iter() and next() (dpseg.train.loop).
        return self._mapped(super().__iter__(), log)

    def _mapped(self, batches, log):
        for collated in batches:
            sizes = log.popleft() if log is not None else None
            self.unit_feed.current = collated.units(sizes, self.unit_feed.unit)
            yield collated.batch

    @property
    def unit(self) -> str:
        return self.unit_feed.unit


class DPDataLoader(UnitTrackingLoader):
    """A DataLoader whose batches are Poisson samples of the dataset's units."""

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        steps: int | None = None,
        collate_fn=None,
        generator: torch.Generator | None = None,
        secure: bool = False,
        distributed: tuple[int, int] | None = None,
        patients: PatientIndex | None = None,
        unit_feed: UnitFeed | None = None,
        **kwargs,
    ):
        """``steps`` (batches a pass) defaults to round(1/q), a function of the public rate
        alone. ``distributed=(rank, world_size)``: this rank's share of one global Poisson
        draw (dpseg.privacy.distributed). ``patients``: sample patients, not items."""
        n = len(patients) if patients is not None else len(dataset)
        steps = steps if steps is not None else max(1, int(round(1 / sample_rate)))
        self.sample_rate = sample_rate
        if distributed is None:
            sampler = PoissonBatchSampler(n, sample_rate, steps, generator, secure, patients)
        else:
            sampler = DistributedPoissonBatchSampler(
                n, sample_rate, steps, *distributed, generator, secure, patients
            )
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=UnitCollate(dataset, collate_fn or default_collate),
            generator=generator,
            **kwargs,
        )
        self.unit_feed = unit_feed or UnitFeed("patient" if patients is not None else "item")

    @property
    def num_units(self) -> int:
        return self.batch_sampler.num_samples

    @property
    def patients(self) -> PatientIndex | None:
        return self.batch_sampler.patients

    @property
    def user_collate_fn(self):
        return self.collate_fn.collate_fn

    @classmethod
    def from_data_loader(
        cls,
        loader: DataLoader,
        generator: torch.Generator | None = None,
        secure: bool = False,
        distributed: tuple[int, int] | None = None,
        sample_rate: float | None = None,
        patients: PatientIndex | None = None,
    ) -> DPDataLoader:
        """Same dataset, workers and collate, Poisson batches. With ``sample_rate`` (public,
        fixed in advance) a pass is round(1/q) steps; without, Opacus's convention: q =
        1 / len(loader) and as many steps, both functions of the dataset's size."""
        if isinstance(loader, DPDataLoader):
            sampler = loader.batch_sampler
            shard = getattr(sampler, "rank", None), getattr(sampler, "world_size", None)
            if distributed is not None and shard != tuple(distributed):
                raise ValueError(
                    "under DistributedDataParallel pass an ordinary DataLoader over the whole "
                    "dataset (dpseg splits each Poisson draw by rank), not a DPDataLoader"
                )
            if secure and not sampler.secure:
                # secure mode samples from OS entropy, whatever generator the loader was given
                sampler.secure = True
            if patients is None or patients is loader.patients:
                return loader
            sample_rate, steps = loader.sample_rate, len(loader)  # now over the patients
            # The caller's loader keeps drawing from its own generator: a checkpoint that
            # saves that generator's state must still hold the state the batches come from.
            generator = loader.generator
        elif sample_rate is None:
            steps = len(loader)
            sample_rate = 1 / steps
        else:
            steps = None
        collate = loader.collate_fn
        if isinstance(collate, UnitCollate):
            collate = collate.collate_fn
        return cls(
            loader.dataset,
            sample_rate=sample_rate,
            steps=steps,
            collate_fn=collate,
            generator=generator if generator is not None else loader.generator,
            secure=secure,
            distributed=distributed,
            patients=patients,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
        )


def track_units(loader: DataLoader, unit_feed: UnitFeed) -> UnitTrackingLoader:
    """``loader`` as it samples (fixed shuffled batches, say), with each item a unit and its
    rows mapped: a multi-sample item's rows are still clipped as one."""
    if isinstance(loader, UnitTrackingLoader):
        loader.unit_feed = unit_feed
        return loader
    if loader.batch_sampler is None:
        raise ValueError(
            "the data loader does not batch (batch_size=None); DP-SGD clips the samples of "
            "a batch: give the DataLoader a batch_size"
        )
    tracked = UnitTrackingLoader(
        loader.dataset,
        batch_sampler=loader.batch_sampler,
        collate_fn=UnitCollate(loader.dataset, loader.collate_fn),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
    )
    tracked.unit_feed = unit_feed
    return tracked
