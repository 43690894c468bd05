"""Poisson sampling: each step takes every example independently with probability q.

That is the sampling the RDP/PRV accountants assume (amplification by subsampling); a
fixed-size shuffled batch would not match the epsilon reported. Batches vary in size and
may be empty: an empty batch is collated as zero-size tensors shaped like one example,
and the DP step still adds noise for it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate


class PoissonBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator | None = None,
        secure: bool = False,
    ):
        if num_samples <= 0:
            raise ValueError("Poisson sampling needs a non-empty dataset")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps
        self.generator, self.secure = generator, secure

    def _uniform(self) -> torch.Tensor:
        if self.secure:  # OS entropy, not a seeded generator an attacker could replay
            words = np.frombuffer(os.urandom(8 * self.num_samples), dtype=np.uint64)
            return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * 2.0**-53)
        return torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64)

    def __iter__(self):
        for _ in range(self.steps):
            yield (self._uniform() < self.sample_rate).nonzero().flatten().tolist()

    def __len__(self) -> int:
        return self.steps


class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """Rank ``rank``'s share of one global Poisson draw over ``num_samples`` items."""

    def __init__(
        self, num_samples, sample_rate, steps, rank, world_size, generator=None, secure=False
    ):
        super().__init__(num_samples, sample_rate, steps, generator, secure)
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        mine = torch.arange(self.num_samples) % self.world_size == self.rank
        for _ in range(self.steps):
            # Every rank draws all N uniforms (the same ones from a shared seed), so the
            # split of one global draw, not W independent draws over overlapping data.
            yield ((self._uniform() < self.sample_rate) & mine).nonzero().flatten().tolist()


def _empty_like_example(example):
    if isinstance(example, torch.Tensor):
        return example.new_empty((0, *example.shape))
    if isinstance(example, np.ndarray):
        return torch.empty((0, *example.shape), dtype=torch.from_numpy(example).dtype)
    if isinstance(example, bool | int | float):
        return torch.empty(0, dtype=torch.as_tensor(example).dtype)
    if isinstance(example, tuple | list):
        return type(example)(_empty_like_example(e) for e in example)
    if isinstance(example, dict):
        return {k: _empty_like_example(v) for k, v in example.items()}
    raise TypeError(f"cannot build an empty batch for an example of type {type(example)}")


class _CollateAllowingEmpty:
    def __init__(self, dataset: Dataset, collate_fn):
        self.dataset, self.collate_fn, self._empty = dataset, collate_fn, None

    def __call__(self, batch):
        if len(batch):
            return self.collate_fn(batch)
        if self._empty is None:
            self._empty = _empty_like_example(self.dataset[0])
        return self._empty


class DPDataLoader(DataLoader):
    """A DataLoader whose batches are Poisson samples of the dataset."""

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        steps: int | None = None,
        collate_fn=None,
        generator: torch.Generator | None = None,
        secure: bool = False,
        distributed: tuple[int, int] | None = None,
        **kwargs,
    ):
        """``distributed=(rank, world_size)``: this rank's share of one global Poisson draw
        (dpseg.privacy.distributed)."""
        n = len(dataset)
        steps = steps if steps is not None else int(round(1 / sample_rate))
        self.sample_rate = sample_rate
        if distributed is None:
            sampler = PoissonBatchSampler(n, sample_rate, steps, generator, secure)
        else:
            sampler = DistributedPoissonBatchSampler(
                n, sample_rate, steps, *distributed, generator=generator, secure=secure
            )
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=_CollateAllowingEmpty(dataset, collate_fn or default_collate),
            generator=generator,
            **kwargs,
        )

    @classmethod
    def from_data_loader(
        cls,
        loader: DataLoader,
        generator: torch.Generator | None = None,
        secure: bool = False,
        distributed: tuple[int, int] | None = None,
    ) -> DPDataLoader:
        """Same dataset, workers and collate; q = 1 / len(loader), as many steps an epoch."""
        if isinstance(loader, DPDataLoader):
            sampler = loader.batch_sampler
            shard = getattr(sampler, "rank", None), getattr(sampler, "world_size", None)
            if distributed is not None and shard != tuple(distributed):
                raise ValueError(
                    "under DistributedDataParallel pass an ordinary DataLoader over the whole "
                    "dataset (dpseg splits each Poisson draw by rank), not a DPDataLoader"
                )
            return loader
        steps = len(loader)
        return cls(
            loader.dataset,
            sample_rate=1 / steps,
            steps=steps,
            collate_fn=loader.collate_fn,
            generator=generator if generator is not None else loader.generator,
            secure=secure,
            distributed=distributed,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
        )
