"""BatchMemoryManager: a logical DP batch larger than memory, trained in physical batches.

Opacus's call, Opacus's semantics::

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4,
                            optimizer=optimizer) as physical:
        for x, y in physical:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()   # clips and accumulates; updates at the end of a logical batch

The data loader's batch sampler (Poisson under make_private) still draws each logical batch;
the manager only cuts it into consecutive chunks of at most ``max_physical_batch_size``
items, of whole units (a patient's k items are never split: its rows are clipped as one). An
empty logical batch becomes one empty physical batch, so its step is a noise-only step as
without the manager. Each physical batch's ``optimizer.step()`` clips its samples into a
running clipped sum; the last one of a logical batch adds the noise once, scales once by the
logical expected batch size, updates and steps the accountant once (dpseg.privacy.optimizer).

Which physical batch ends a logical one is recorded when the sampler yields it and read
back when the loader hands that batch over, in the same order. Opacus instead signals the
optimizer from inside the sampler, which runs ahead of the training loop when workers
prefetch; here ``num_workers > 0`` cannot shift the signal onto the wrong batch.
"""

from __future__ import annotations

import math
import warnings
from collections import deque

from torch.utils.data import BatchSampler, DataLoader, Sampler

from dpseg.privacy.data_loader import PoissonBatchSampler, UnitCollate, UnitTrackingLoader
from dpseg.privacy.optimizer import DPOptimizer
from dpseg.privacy.units import UnitFeed


class PhysicalBatchSampler(Sampler[list[int]]):
    """Cuts each logical batch of ``logical`` into chunks of at most ``max_batch_size``
    items, never splitting a unit (a patient's k items stay in one chunk, so its rows are
    clipped together); ``ends`` receives, per chunk yielded, whether it is its logical
    batch's last, and ``unit_log`` the items per unit of each chunk."""

    def __init__(self, logical: Sampler[list[int]], max_batch_size: int):
        self.logical, self.max_batch_size = logical, max_batch_size
        self.ends: deque[bool] = deque()
        self.unit_log: deque[list[int]] = deque()

    def _chunks(self, indices: list[int], sizes: list[int]):
        """(items, items per unit) of each chunk: whole units, greedily up to the cap."""
        chunks, items, units, start = [], [], [], 0
        for n in sizes:
            if n > self.max_batch_size:
                raise ValueError(
                    f"a unit of {n} items does not fit a physical batch of "
                    f"{self.max_batch_size}: a patient's items are clipped together and "
                    "cannot be split across physical batches. Raise max_physical_batch_size "
                    f"to at least {n} (items_per_patient)."
                )
            if len(items) + n > self.max_batch_size:
                chunks.append((items, units))
                items, units = [], []
            items = items + indices[start : start + n]
            units.append(n)
            start += n
        if items or not chunks:  # an empty logical batch: one empty physical batch
            chunks.append((items, units))
        return chunks

    def __iter__(self):
        log = getattr(self.logical, "unit_log", None)
        if log is not None:
            log.clear()
        for indices in self.logical:
            indices = list(indices)
            sizes = log.popleft() if log is not None else [1] * len(indices)
            chunks = self._chunks(indices, sizes)
            for k, (chunk, units) in enumerate(chunks):
                self.ends.append(k == len(chunks) - 1)
                self.unit_log.append(units)
                yield chunk

    @property
    def generator(self):
        """The logical sampler's generator (reseeded per step by dpseg.train.loop)."""
        return getattr(self.logical, "generator", None)

    def __len__(self) -> int:
        """Exact for a fixed-size batch sampler; the expectation (rounded up) for Poisson."""
        s = self.logical
        if isinstance(s, BatchSampler):
            n = len(s.sampler)
            full, rest = divmod(n, s.batch_size)
            count = full * math.ceil(s.batch_size / self.max_batch_size)
            if rest and not s.drop_last:
                count += math.ceil(rest / self.max_batch_size)
            return count
        if isinstance(s, PoissonBatchSampler):
            k = s.patients.items_per_patient if s.patients is not None else 1
            expected = s.sample_rate * s.num_samples * k
            return len(s) * max(1, math.ceil(expected / self.max_batch_size))
        return len(s)


class _PhysicalDataLoader(UnitTrackingLoader):
    """The logical loader's dataset, workers and collate, with physical batches; tells the
    optimizer before each batch whether its step ends the logical batch."""

    def __init__(self, loader: DataLoader, max_batch_size: int, optimizer: DPOptimizer):
        self._optimizer = optimizer
        kwargs = {}
        if loader.num_workers > 0:
            kwargs = dict(
                prefetch_factor=loader.prefetch_factor,
                persistent_workers=loader.persistent_workers,
            )
        collate = loader.collate_fn
        if not isinstance(collate, UnitCollate):
            collate = UnitCollate(loader.dataset, collate)
        super().__init__(
            loader.dataset,
            batch_sampler=PhysicalBatchSampler(loader.batch_sampler, max_batch_size),
            num_workers=loader.num_workers,
            collate_fn=collate,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            **kwargs,
        )
        # The private model reads each physical batch's unit map from the logical loader's
        # feed; a plain loader (not from make_private) maps each item to a unit.
        self.unit_feed = getattr(loader, "unit_feed", None) or UnitFeed()
        # reseed_step() and samplers that expose their generator keep working through us.
        self.sample_rate = getattr(loader, "sample_rate", None)

    def __iter__(self):
        ends = self.batch_sampler.ends
        ends.clear()
        return self._signalled(super().__iter__(), ends)

    def _signalled(self, batches, ends):
        for batch in batches:
            self._optimizer.signal_skip_step(do_skip=not ends.popleft())
            yield batch


class BatchMemoryManager:
    """Context manager; entering it returns the loader of physical batches."""

    def __init__(
        self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: DPOptimizer
    ):
        if not isinstance(optimizer, DPOptimizer):
            hint = (
                " (an Opacus optimizer: use opacus.utils.batch_memory_manager with it)"
                if type(optimizer).__module__.startswith("opacus")
                else ""
            )
            raise TypeError(
                "BatchMemoryManager needs the optimizer returned by dpseg's "
                f"PrivacyEngine.make_private, got {type(optimizer).__name__}{hint}"
            )
        if (
            isinstance(max_physical_batch_size, bool)
            or not isinstance(max_physical_batch_size, int)
            or max_physical_batch_size < 1
        ):
            raise ValueError(
                f"max_physical_batch_size must be an int >= 1, got {max_physical_batch_size!r}"
            )
        if not isinstance(data_loader, DataLoader) or data_loader.batch_sampler is None:
            raise TypeError(
                "BatchMemoryManager needs a torch DataLoader that yields batches (the one "
                "make_private returned)"
            )
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> DataLoader:
        return _PhysicalDataLoader(self.data_loader, self.max_physical_batch_size, self.optimizer)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.optimizer.signal_skip_step(do_skip=False)
        if self.optimizer.accumulating:
            # Left mid-way through a logical batch (a break, an exception): its clipped sum
            # was never released, and must not leak into the next step.
            self.optimizer.discard_accumulated()
            if exc_type is None:
                warnings.warn(
                    "BatchMemoryManager: the loop ended inside a logical batch; the physical "
                    "batches accumulated so far were dropped without an update (nothing of "
                    "them was released).",
                    stacklevel=2,
                )
