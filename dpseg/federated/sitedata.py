"""The segmentation workload of a federation: each site's training and held-out patients,
loaded once into memory, and the evaluation of a global model on them.

Volumes are shared read-only between the runs of a ``--compare`` (one copy in memory);
each run builds its own PatchDataset from them with the same seed, so every engine sees
the same patches in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpseg.data import MSDDataset, PatchDataset, Preprocessing, write_phantom_dataset
from dpseg.federated.partition import (
    PARTITIONS,
    dirichlet_split,
    iid_split,
    quantity_skew_split,
    split_by_group,
    train_test_split,
)
from dpseg.privacy.secret import derive_seed
from dpseg.train.metrics import dice_per_class

__all__ = [
    "SiteData", "evaluate_dice", "load_sites", "partition_cases", "phantom_sites",
    "site_preprocessing",
]  # fmt: skip


@dataclass
class SiteData:
    name: str
    train_images: list[np.ndarray]
    train_labels: list[np.ndarray]
    test_images: list[np.ndarray] = field(default_factory=list)
    test_labels: list[np.ndarray] = field(default_factory=list)
    cases: dict[str, list[str]] = field(default_factory=dict)  # {"train": names, "test": names}

    def patches(
        self,
        patch: int,
        p_foreground: float,
        seed: int,
        spatial_dims: int = 3,
        samples_per_item: int = 1,
    ) -> PatchDataset:
        """``samples_per_item`` patches (3-D) or axial slices (2-D) per patient per draw."""
        return PatchDataset(
            self.train_images, self.train_labels, (patch,) * spatial_dims,
            p_foreground=p_foreground, spatial_dims=spatial_dims, seed=seed,
            samples_per_item=samples_per_item,
        )  # fmt: skip


def partition_cases(
    groups: Sequence[str], partition: str, sites: int | None, alpha: float, seed: int
) -> dict[str, list[int]]:
    """{site name: case indices}. ``groups`` is each case's dataset.json site."""
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; use one of {PARTITIONS}")
    if partition == "site":
        by_site = split_by_group(groups)
        if sites is not None and sites != len(by_site):
            raise ValueError(
                f"dataset.json records {len(by_site)} site(s) ({', '.join(map(str, by_site))}) "
                f"but {sites} were asked for; drop --sites or choose a split "
                "(--partition iid|quantity|dirichlet)"
            )
        return {str(k): v for k, v in by_site.items()}
    if sites is None:
        raise ValueError(f"--partition {partition} needs --sites K")
    if partition == "iid":
        parts = iid_split(len(groups), sites, seed)
    elif partition == "quantity":
        parts = quantity_skew_split(len(groups), sites, alpha, seed)
    else:
        parts = dirichlet_split(list(groups), sites, alpha, seed)
    return {f"site{k}": p for k, p in enumerate(parts)}


def site_preprocessing(dataset: MSDDataset, normalize: str = "auto") -> Preprocessing:
    """Every site's preprocessing: the CT window for CT, each volume's percentiles for MR
    (dpseg.train.config.resolve_normalize, as `dpseg train`)."""
    from dpseg.train.config import resolve_normalize

    return Preprocessing(normalize=resolve_normalize(normalize, dataset.modality))


def load_sites(
    root: str | Path,
    *,
    partition: str = "site",
    sites: int | None = None,
    alpha: float = 0.5,
    test_fraction: float = 0.25,
    seed: int = 0,
    preprocessing: Preprocessing | None = None,
    label_map: dict[int, int] | None = None,
    split: str | None = None,
    normalize: str = "auto",
) -> tuple[list[SiteData], int]:
    """(sites, number of classes) from an MSD folder; each site holds some patients out.
    `split` (``FILE[:KEY]``, dpseg.train.splits): only the listed cases are partitioned and
    loaded, each site's held-out cases drawn from them."""
    dataset = MSDDataset(root, label_map=label_map)
    listed = list(range(len(dataset)))
    if split:
        from dpseg.train.splits import read_case_list, select_cases

        names = [c.name for c in dataset.cases]
        listed = select_cases(names, read_case_list(split), split)
    groups = [dataset.cases[i].site for i in listed]
    parts = {
        name: [listed[j] for j in part]
        for name, part in partition_cases(groups, partition, sites, alpha, seed).items()
    }
    prep = preprocessing or site_preprocessing(dataset, normalize)
    out = []
    for k, (name, indices) in enumerate(parts.items()):
        train, test = train_test_split(indices, test_fraction, derive_seed(seed, 4, k))
        data = SiteData(name, [], [], cases={"train": [], "test": []})
        for split, idx in (("train", train), ("test", test)):
            for i in idx:
                image, label, _ = prep.apply(*dataset.load(i))
                getattr(data, f"{split}_images").append(image)
                getattr(data, f"{split}_labels").append(label)
                data.cases[split].append(dataset.cases[i].name)
        out.append(data)
    return out, dataset.num_classes


def phantom_sites(
    folder: str | Path,
    cases: int,
    sites: int,
    *,
    size: int = 32,
    seed: int = 0,
    test_fraction: float = 0.25,
    progress: bool = False,
) -> tuple[list[SiteData], int]:
    """Write (or reuse) a phantom MSD folder, case c from scanner c % sites, and load it by
    its dataset.json sites: the same code path as --data."""
    write_phantom_dataset(folder, cases, sites, size=size, seed=seed, progress=progress)
    return load_sites(folder, partition="site", test_fraction=test_fraction, seed=seed)


@torch.no_grad()
def evaluate_dice(
    model: nn.Module,
    sites: Sequence[SiteData],
    patch: int,
    num_classes: int = 2,
    overlap: float = 0.25,
    device: str | torch.device = "cpu",
    spatial_dims: int = 3,
) -> dict:
    """Mean foreground Dice of the model on every site's held-out cases, and pooled over
    all of them (each case counts once), as predicted and with each organ's largest
    connected component kept (dpseg predict --largest-component):
    {"sites", "pooled", "sites_largest_component", "pooled_largest_component",
    "cases": {case: [dice, dice with the largest component]}}. A 2-D model predicts the
    axial slices one by one."""
    from dpseg.train.loop import predict_volume
    from dpseg.train.postprocess import keep_largest_component

    model.eval()
    out = {"sites": {}, "sites_largest_component": {}, "cases": {}}
    every, every_lc = [], []
    for s in sites:
        scores, kept = [], []
        names = s.cases.get("test", [])
        for i, (image, label) in enumerate(zip(s.test_images, s.test_labels, strict=True)):
            probs = predict_volume(
                model, image, patch, spatial_dims, overlap, device, batch_size=8, softmax=False
            )
            pred = probs.argmax(0).numpy()
            scores.append(float(np.mean(dice_per_class(pred, label, num_classes))))
            lc = keep_largest_component(pred, num_classes)
            kept.append(float(np.mean(dice_per_class(lc, label, num_classes))))
            out["cases"][names[i] if i < len(names) else f"{s.name}/{i}"] = [scores[-1], kept[-1]]
        out["sites"][s.name] = float(np.mean(scores)) if scores else None
        out["sites_largest_component"][s.name] = float(np.mean(kept)) if kept else None
        every += scores
        every_lc += kept
    out["pooled"] = float(np.mean(every)) if every else None
    out["pooled_largest_component"] = float(np.mean(every_lc)) if every_lc else None
    return out
