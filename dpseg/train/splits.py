"""Committed case splits: which cases a run may train on and which are kept for the test.

A split file is JSON with named lists of case ids (the image file name without .nii.gz, as
`MSDDataset` names cases)::

    {"about": "...", "seed": 0, "unit": "case",
     "lists": {"train": [...], "test": [...], "train40_s0": [...], ...}}

A command names one list as ``FILE[:KEY]``: ``dpseg train --split split.json`` trains on
"train" (its own validation cases are drawn from inside that list, so model selection never
sees "test"), ``dpseg evaluate --cases split.json:test`` scores "test". `make_split` writes
the lists reproducibly from a seed: a test set, and nested training subsets (40 of 80 of
160) for a data-size study.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpseg.data import DataError

__all__ = ["make_split", "parse_split_spec", "read_case_list", "select_cases"]


def make_split(
    names: Sequence[str],
    test: int,
    seed: int,
    subset_sizes: Sequence[int] = (),
    subset_seeds: Sequence[int] = (0,),
) -> dict[str, list[str]]:
    """{"train", "test", "train{n}_s{s}" ...}: a seeded draw of `test` cases for the test
    list, the rest for "train"; for each subset seed, one shuffle of "train" whose first n
    cases are "train{n}_s{s}", so the subsets of one seed are nested. Lists are sorted; the
    result depends only on the set of names, the sizes and the seeds (not on their order)."""
    names = sorted(set(names))
    if not 0 < test < len(names):
        raise ValueError(f"test must be in [1, {len(names) - 1}] for {len(names)} cases")
    order = np.random.default_rng([seed, 24]).permutation(len(names))
    test_names = sorted(names[i] for i in order[:test])
    train = sorted(names[i] for i in order[test:])
    out = {"train": train, "test": test_names}
    for n in subset_sizes:
        if not 0 < n <= len(train):
            raise ValueError(f"subset size {n} must be in [1, {len(train)}]")
    for s in subset_seeds:
        shuffled = [train[i] for i in np.random.default_rng([seed, 24, s]).permutation(len(train))]
        for n in sorted(subset_sizes):
            out[f"train{n}_s{s}"] = sorted(shuffled[:n])
    return out


def parse_split_spec(spec: str | Path, default_key: str) -> tuple[Path, str]:
    """``FILE[:KEY]`` -> (FILE, KEY); KEY defaults to `default_key`. A colon inside a path
    (a Windows drive) is kept when what follows it is not a plain key."""
    text = str(spec)
    path, sep, key = text.rpartition(":")
    if sep and key and "/" not in key and "\\" not in key and path:
        return Path(path), key
    return Path(text), default_key


def read_case_list(spec: str | Path, default_key: str = "train") -> list[str]:
    """The case ids of list KEY in split FILE (``FILE[:KEY]``); DataError naming what to fix."""
    path, key = parse_split_spec(spec, default_key)
    if not path.is_file():
        raise DataError(
            f"{path}: split file not found. Give a JSON file with named case lists, e.g. "
            "docs/results/hippocampus/split.json (written by make_split.py beside it)."
        )
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as JSON ({exc}). Fix or regenerate it.") from exc
    lists = data.get("lists") if isinstance(data, dict) else None
    if not isinstance(lists, dict):
        raise DataError(
            f'{path}: not a split file: it needs a "lists" object of named case lists, '
            'e.g. {"lists": {"train": [...], "test": [...]}}.'
        )
    if key not in lists:
        raise DataError(
            f"{path}: has no list {key!r} (lists: {', '.join(sorted(lists))}). Name one as "
            f"{path}:KEY."
        )
    names = lists[key]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: list {key!r} must be a non-empty list of case ids (strings).")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: list {key!r} names a case twice; each case once.")
    return names


def select_cases(case_names: Sequence[str], wanted: Sequence[str], source: str) -> list[int]:
    """Indices (in dataset order) of the cases named in `wanted`; DataError listing the ids
    the dataset lacks (a split written for another folder)."""
    index = {n: i for i, n in enumerate(case_names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        raise DataError(
            f"{source}: {len(missing)} listed case(s) are not in the dataset ({shown}). The "
            "split was written for another folder: point --data at the dataset it lists, or "
            "write a split for this one."
        )
    return sorted(index[n] for n in wanted)
