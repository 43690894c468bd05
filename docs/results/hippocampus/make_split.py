"""Writes split.json beside this file: 160 training and 40 test cases of the 200-case
Task04 hippocampus set, and nested training subsets (40 of 80 of 160) for two seeds.

    .venv/bin/python docs/results/hippocampus/make_split.py [--data ../shared/data/hippocampus]

Deterministic: the lists depend only on the case ids in dataset.json and SEED (see
dpseg.train.splits.make_split); rerunning rewrites the same file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpseg.data import MSDDataset
from dpseg.train.splits import make_split

SEED = 24  # the number; fixed before any result was seen
TEST = 40
SUBSETS = (40, 80)  # the full 160 is "train" itself
SUBSET_SEEDS = (0, 1)

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HERE.parents[2].parent / "shared/data/hippocampus")
    ap.add_argument("--out", type=Path, default=HERE / "split.json")
    args = ap.parse_args()
    names = [c.name for c in MSDDataset(args.data, check_headers=False).cases]
    lists = make_split(names, TEST, SEED, SUBSETS, SUBSET_SEEDS)
    split = {
        "about": (
            f"MSD Task04 hippocampus ({len(names)} cases of ../shared/data/hippocampus): "
            f"{len(lists['train'])} training and {len(lists['test'])} test cases by case id; "
            "trainN_sS: the first N of seed S's shuffle of 'train' (nested: 40 of 80 of 160). "
            "The unit is the case (one hemisphere's crop); no subject map is published, so a "
            "subject's two crops may sit on both sides of the split. Written by make_split.py."
        ),
        "seed": SEED,
        "unit": "case",
        "lists": lists,
    }
    args.out.write_text(json.dumps(split, indent=1) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in lists.items()))


if __name__ == "__main__":
    main()
