"""Scores nnUNetv2_predict's masks of the 40 test cases against their labels, as `dpseg
evaluate` scores dpseg's models (Dice per label, 1 when both masks are empty; no
post-processing), and sets them beside dpseg's own U-Net (docs/results/hippocampus):

    NNHIPPO=/work/nnhippo python docs/results/nnunet_hippocampus/score.py

Writes FOLDER/<trainer>.json (F.json-shaped: per_case, dice_per_label, mean_dice, the
ledger's epsilon) and summary.md with a 95% bootstrap interval over cases for each figure
and paired intervals against dpseg's U-Net.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from dpseg.train.scoring import paired_bootstrap

HERE = Path(__file__).parent
RUNS = Path(os.environ.get("NNHIPPO", "runs/nnunet_hippocampus"))
LABELS = ("1", "2")
FOLDERS = {
    "nnUNetTrainer": "nnUNetTrainer__nnUNetPlans_cpu__3d_fullres",
    "nnUNetTrainerDP": "nnUNetTrainerDP__nnUNetPlans_cpu__3d_fullres",
}
DPSEG = {"dpseg U-Net, non-private (seed 0)": "nodp_s0", "dpseg U-Net, DP (seed 0)": "dp_s0"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def score(pred_dir: Path, label_dir: Path) -> dict:
    per_case = {}
    for path in sorted(label_dir.glob("*.nii.gz")):
        case = path.name.removesuffix(".nii.gz")
        truth = np.asarray(nib.load(path).dataobj).astype(np.int64)
        pred = np.asarray(nib.load(pred_dir / path.name).dataobj).astype(np.int64)
        if pred.shape != truth.shape:
            raise ValueError(f"{case}: prediction {pred.shape} against label {truth.shape}")
        per_label = {k: dice(pred == int(k), truth == int(k)) for k in LABELS}
        per_case[case] = {
            "dice_per_label": per_label,
            "mean_dice": float(np.mean(list(per_label.values()))),
        }
    return {
        "cases": len(per_case),
        "dice_per_label": {
            k: float(np.mean([c["dice_per_label"][k] for c in per_case.values()])) for k in LABELS
        },
        "mean_dice": float(np.mean([c["mean_dice"] for c in per_case.values()])),
        "per_case": per_case,
    }


def interval(values, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def minutes(log: Path) -> float | None:
    found = re.search(r"trained in ([0-9.]+) min", log.read_text()) if log.exists() else None
    return float(found.group(1)) if found else None


def main() -> None:
    raw = RUNS / "raw" / "Dataset004_Hippocampus"
    rows, scored = [], {}
    for trainer, folder in FOLDERS.items():
        pred = RUNS / "pred" / trainer
        if not pred.exists():
            continue
        f = score(pred, raw / "labelsTs")
        fold = RUNS / "res" / "Dataset004_Hippocampus" / folder / "fold_all"
        ledger = fold / "privacy.json"
        record = json.loads(ledger.read_text()) if ledger.exists() else {}
        f.update(
            {
                k: record.get(k)
                for k in ("epsilon", "delta", "unit", "noise_multiplier", "steps_accounted")
            }
        )
        f["train_minutes"] = minutes(
            RUNS / "logs" / ("dp.log" if trainer.endswith("DP") else "nodp.log")
        )
        (HERE / f"{trainer}.json").write_text(json.dumps(f, indent=1))
        scored[trainer] = f
        rows.append(
            (
                f"nnU-Net 3d_fullres (plans_cpu), {'DP' if 'DP' in trainer else 'non-private'}",
                f,
            )
        )
    for name, run in DPSEG.items():
        path = HERE.parent / "hippocampus" / run / "test.json"
        if path.exists():
            rows.append((name, json.loads(path.read_text())))
    lines = [
        "| model | anterior | posterior | mean [95% CI over cases] | epsilon | train minutes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in rows:
        lo, hi = interval([c["mean_dice"] for c in f["per_case"].values()])
        eps = f.get("epsilon")
        lines.append(
            f"| {name} | {f['dice_per_label']['1']:.3f} | {f['dice_per_label']['2']:.3f} | "
            f"{f['mean_dice']:.3f} [{lo:.3f}, {hi:.3f}] | {'-' if eps is None else f'{eps:.2f}'} | "
            f"{f.get('train_minutes') or '-'} |"
        )
    pairs = []
    for trainer, run in (("nnUNetTrainer", "nodp_s0"), ("nnUNetTrainerDP", "dp_s0")):
        other = HERE.parent / "hippocampus" / run / "test.json"
        if trainer in scored and other.exists():
            b = paired_bootstrap(scored[trainer], json.loads(other.read_text()))
            pairs.append(
                f"- {trainer} - dpseg U-Net {run}: {b['diff']:+.3f} [{b['ci'][0]:.3f}, "
                f"{b['ci'][1]:.3f}] mean Dice (paired bootstrap over the {b['cases']} cases)"
            )
    (HERE / "summary.md").write_text("\n".join(lines + [""] + pairs) + "\n")
    print("\n".join(lines + [""] + pairs))


if __name__ == "__main__":
    main()
