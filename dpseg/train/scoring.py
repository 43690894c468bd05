"""`dpseg evaluate`: score a saved model on the labelled cases of any MSD folder, and compare
two scorings case by case.

`evaluate_checkpoint` takes a `dpseg train` checkpoint or a `dpseg federate` one (its global
model; dpseg.train.saved_model) and predicts every case (or a listed subset) with its own
preprocessing and sliding window, scores Dice per label on the case's own grid (a run that
resampled has its class scores resampled back first, as `dpseg predict` does), as predicted
and with each label's largest connected component kept, and reads the privacy guarantee from
the checkpoint's ledger(s). Its result is F.json::

    {"cases": n, "dice_per_label": {"1": d, "2": d}, "mean_dice": d,
     "largest_component": {"dice_per_label": ..., "mean_dice": d},
     "per_case": {case: {"dice_per_label", "mean_dice", "largest_component": {...}}},
     "epsilon": e, "delta": d, "unit": u, "adjacency": a, ...}

`mean_dice` is the mean over cases of each case's mean over the foreground labels. Cases the
model trained or was validated on are named in "seen_in_training" (and warned about).

`paired_bootstrap` gives the 95% interval of the mean per-case difference between two
F.json files over the same cases (the case, not the voxel, is the independent unit).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dpseg.data import DataError, MSDDataset, resample_to_shape
from dpseg.train.loop import predict_volume
from dpseg.train.metrics import dice_per_class
from dpseg.train.postprocess import keep_largest_component
from dpseg.train.saved_model import SavedModel, ledger_privacy, load_saved_model, model_label

__all__ = [
    "evaluate_checkpoint",
    "format_comparison",
    "format_table",
    "ledger_privacy",
    "model_label",
    "overlay_panels",
    "paired_bootstrap",
    "read_scores",
]

FORMAT = "dpseg-evaluate-1"


# --- scoring -------------------------------------------------------------------------------
def _scores(pred: np.ndarray, label: np.ndarray, labels: Sequence[int], k: int) -> dict:
    per = dice_per_class(pred, label, k)
    d = {str(c): float(per[c - 1]) for c in labels}
    return {"dice_per_label": d, "mean_dice": float(np.mean(list(d.values())))}


def _summary(rows: Sequence[dict], labels: Sequence[int]) -> dict:
    return {
        "dice_per_label": {
            str(c): float(np.mean([r["dice_per_label"][str(c)] for r in rows])) for c in labels
        },
        "mean_dice": float(np.mean([r["mean_dice"] for r in rows])),
    }


def _case_indices(dataset: MSDDataset, cases: str | Sequence[str] | None) -> tuple[list, str]:
    from dpseg.train.splits import read_case_list, select_cases

    names = [c.name for c in dataset.cases]
    if cases is None:
        picked = [i for i, c in enumerate(dataset.cases) if c.label_path is not None]
        source = f"every labelled case of {dataset.root}"
    else:
        spec = str(cases) if isinstance(cases, str | Path) else None
        wanted = read_case_list(spec, "test") if spec is not None else list(cases)
        picked = select_cases(names, wanted, spec or "the case list")
        source = spec or f"{len(picked)} listed cases"
    unlabelled = [names[i] for i in picked if dataset.cases[i].label_path is None]
    if unlabelled:
        raise DataError(
            f"{dataset.json_path}: case(s) {', '.join(unlabelled[:5])} have no label to score "
            "against. List only labelled cases."
        )
    if not picked:
        raise DataError(
            f"{dataset.json_path}: no labelled case to score. Point --data at an MSD folder "
            "whose dataset.json lists image and label pairs."
        )
    return picked, source


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    cases: str | Sequence[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    overlap: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """F.json's dict for a `dpseg train` or `dpseg federate` checkpoint. `cases`: None (every
    labelled case), a split spec ``FILE[:KEY]`` (KEY defaults to "test") or a list of ids."""
    t0 = time.perf_counter()
    saved = load_saved_model(checkpoint, device)
    dataset = MSDDataset(data, channel=saved.channel)
    saved.check_dataset(dataset)
    k = saved.out_channels
    labels = list(range(1, k))
    picked, source = _case_indices(dataset, cases)
    prep = saved.preprocessing(dataset)
    overlap = saved.overlap if overlap is None else overlap
    per_case: dict[str, dict] = {}
    for i in tqdm(picked, desc="evaluating", unit="case", disable=None if progress else True):
        image, label = dataset.load(i)
        img, _, _ = prep.apply(image, label)
        scores = predict_volume(
            saved.model, img, saved.patch, saved.spatial_dims, overlap, device,
            softmax=saved.softmax,
        )  # fmt: skip
        if tuple(scores.shape[1:]) != label.shape:  # the run resampled: score on the case's grid
            scores = torch.from_numpy(
                np.stack([resample_to_shape(s.numpy(), label.shape, order=1) for s in scores])
            )
        pred = scores.argmax(0).numpy().astype(np.uint8)
        truth = np.asarray(label.array)
        row = _scores(pred, truth, labels, k)
        row["largest_component"] = _scores(keep_largest_component(pred, k), truth, labels, k)
        per_case[dataset.cases[i].name] = row
    rows = list(per_case.values())
    seen = sorted(set(per_case) & saved.seen)
    if seen:
        warnings.warn(
            f"{len(seen)} of the {len(per_case)} scored cases were used to train or validate "
            f"{checkpoint} ({', '.join(seen[:3])}{' ...' if len(seen) > 3 else ''}): their "
            "Dice is not a held-out score",
            stacklevel=2,
        )
    return {
        "format": FORMAT,
        "checkpoint": str(checkpoint),
        "checkpoint_kind": saved.kind,
        "data": str(data),
        "case_source": source,
        "cases": len(rows),
        "label_names": {str(c): dataset.labels.get(c, str(c)) for c in labels},
        **_summary(rows, labels),
        "largest_component": _summary([r["largest_component"] for r in rows], labels),
        **saved.privacy,
        "model": saved.label,
        "seen_in_training": seen,
        "train_config": saved.train_config,
        ("trained_steps" if saved.kind == "train" else "trained_rounds"): saved.steps,
        "overlap": overlap,
        "device": str(device),
        "seconds": time.perf_counter() - t0,
        "per_case": per_case,
    }


def overlay_panels(
    checkpoints: Mapping[str, str | Path | SavedModel],
    data: str | Path,
    case_names: Sequence[str],
    dice: Mapping[str, Mapping[str, float]] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> list:
    """An overlay `Panel` per case: the image and truth on the first model's preprocessed
    grid, and each model's label map ({name: checkpoint path or SavedModel}, in order) on
    that grid. `dice`: {model name: {case: Dice}} to print above the predictions; a model it
    lacks is scored on the panel's grid."""
    from dpseg.train.overlay import Panel

    models = {
        name: m if isinstance(m, SavedModel) else load_saved_model(m, device)
        for name, m in checkpoints.items()
    }
    first = next(iter(models.values()))
    dataset = MSDDataset(data, channel=first.channel)
    first.check_dataset(dataset)
    index = {c.name: i for i, c in enumerate(dataset.cases)}
    preps = {name: m.preprocessing(dataset) for name, m in models.items()}
    panels = []
    for case in case_names:
        image, label = dataset.load(index[case])
        img, lab, _ = preps[next(iter(models))].apply(image, label)
        preds = {}
        for name, m in models.items():
            x, _, _ = preps[name].apply(image)
            p = predict_volume(
                m.model, x, m.patch, m.spatial_dims, m.overlap, device, softmax=m.softmax
            )
            pred = p.argmax(0).numpy().astype(np.uint8)
            if pred.shape != lab.shape:
                pred = resample_to_shape(pred, lab.shape, order=0)
            preds[name] = pred
        scores = {n: float(d[case]) for n, d in (dice or {}).items() if case in d}
        for name, pred in preds.items():  # the others, on this grid
            scores.setdefault(name, float(np.mean(dice_per_class(pred, lab, dataset.num_classes))))
        panels.append(Panel(case, img, lab, preds, scores))
    return panels


# --- reading and comparing -----------------------------------------------------------------
def read_scores(path: str | Path) -> dict[str, Any]:
    """An F.json written by `dpseg evaluate`; DataError saying what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(
            f"{path}: cannot be read ({exc.strerror or exc}). Give an F.json that "
            "`dpseg evaluate --out F.json` wrote."
        ) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not JSON ({exc}); give an F.json of dpseg evaluate.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("per_case"), dict):
        raise DataError(
            f"{path}: has no 'per_case' scores; give an F.json that `dpseg evaluate` wrote."
        )
    return data


def _metric(row: Mapping[str, Any], metric: str, largest_component: bool) -> float:
    if largest_component:
        row = row["largest_component"]
    if metric == "mean_dice":
        return float(row["mean_dice"])
    return float(row["dice_per_label"][metric])


def paired_bootstrap(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    metric: str = "mean_dice",
    largest_component: bool = False,
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean over cases of (a - b) for `metric` ("mean_dice" or a label "1", "2", ...) and its
    percentile bootstrap interval at `level`, resampling cases with replacement (the pairs
    stay together). `a` and `b` are F.json dicts that scored the same cases; ValueError
    otherwise. Deterministic for a given seed."""
    pa, pb = a["per_case"], b["per_case"]
    if set(pa) != set(pb):
        only_a, only_b = sorted(set(pa) - set(pb)), sorted(set(pb) - set(pa))
        raise ValueError(
            f"the two scorings cover different cases ({len(only_a)} only in the first, e.g. "
            f"{only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]}): evaluate "
            "both models on the same --cases"
        )
    if not pa:
        raise ValueError("no cases to compare")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    names = sorted(pa)
    xa = np.array([_metric(pa[n], metric, largest_component) for n in names])
    xb = np.array([_metric(pb[n], metric, largest_component) for n in names])
    d = xa - xb
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "metric": metric,
        "largest_component": largest_component,
        "cases": len(d),
        "mean_a": float(xa.mean()),
        "mean_b": float(xb.mean()),
        "diff": float(d.mean()),
        "ci": [float(lo), float(hi)],
        "level": level,
        "n_boot": n_boot,
        "a_better": int((d > 0).sum()),
        "b_better": int((d < 0).sum()),
    }


def compare_scores(a: Mapping[str, Any], b: Mapping[str, Any], **kw) -> list[dict[str, Any]]:
    """`paired_bootstrap` for the mean Dice and each label, as predicted and with the
    largest component kept."""
    labels = sorted(next(iter(a["per_case"].values()))["dice_per_label"], key=int)
    return [
        paired_bootstrap(a, b, metric, lc, **kw)
        for lc in (False, True)
        for metric in ("mean_dice", *labels)
    ]


# --- text ----------------------------------------------------------------------------------
def privacy_text(result: Mapping[str, Any]) -> str:
    if result.get("epsilon") is None:
        return "epsilon inf (trained without DP)"
    return (
        f"epsilon {result['epsilon']:.2f} (delta {result['delta']:g}, unit {result['unit']}, "
        f"adjacency {result['adjacency']})"
    )


def format_table(result: Mapping[str, Any]) -> str:
    """The stdout table of one scoring."""
    names = result.get("label_names", {})
    width = max([len("mean over labels")] + [len(f"{c} {n}") for c, n in names.items()])
    lines = [
        f"{result['cases']} cases ({result['case_source']}), model {result['model']}",
        f"{'label':<{width}}  {'Dice':>7}  {'largest component':>17}",
    ]
    lc = result["largest_component"]
    for c, d in result["dice_per_label"].items():
        lines.append(
            f"{c + ' ' + names.get(c, ''):<{width}}  {d:>7.3f}  {lc['dice_per_label'][c]:>17.3f}"
        )
    lines.append(
        f"{'mean over labels':<{width}}  {result['mean_dice']:>7.3f}  {lc['mean_dice']:>17.3f}"
    )
    lines.append(privacy_text(result))
    if result.get("seen_in_training"):
        lines.append(
            f"warning: {len(result['seen_in_training'])} case(s) were seen in training; "
            "not a held-out score"
        )
    return "\n".join(lines)


def format_comparison(rows: Sequence[Mapping[str, Any]], a_name: str, b_name: str) -> str:
    level = rows[0]["level"] if rows else 0.95
    lines = [
        f"A = {a_name}",
        f"B = {b_name}",
        f"paired over {rows[0]['cases'] if rows else 0} cases; {level:.0%} percentile bootstrap "
        f"interval of the mean difference ({rows[0]['n_boot'] if rows else 0} resamples)",
        f"{'metric':<24}{'A':>7}{'B':>7}{'A - B':>8}  {'interval':<18}{'A wins':>7}{'B wins':>7}",
    ]
    for r in rows:
        name = ("mean Dice" if r["metric"] == "mean_dice" else f"label {r['metric']}") + (
            ", largest comp." if r["largest_component"] else ""
        )
        ci = f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"
        lines.append(
            f"{name:<24}{r['mean_a']:>7.3f}{r['mean_b']:>7.3f}{r['diff']:>+8.3f}  {ci:<18}"
            f"{r['a_better']:>7}{r['b_better']:>7}"
        )
    return "\n".join(lines)


def format_markdown(result: Mapping[str, Any], overlay: str | None) -> str:
    """F.md beside F.json: the summary, the overlay panels and the per-case table."""
    names = result.get("label_names", {})
    lc = result["largest_component"]
    md = [
        f"# dpseg evaluate: {Path(result['checkpoint']).parent.name or result['checkpoint']}",
        "",
        f"Checkpoint `{result['checkpoint']}`, {result['cases']} cases of `{result['data']}` "
        f"({result['case_source']}); model {result['model']}; {privacy_text(result)}.",
        "",
        "| label | Dice | largest component kept |",
        "| --- | --- | --- |",
    ]
    for c, d in result["dice_per_label"].items():
        md.append(f"| {c} {names.get(c, '')} | {d:.3f} | {lc['dice_per_label'][c]:.3f} |")
    md.append(f"| mean over labels | {result['mean_dice']:.3f} | {lc['mean_dice']:.3f} |")
    if result.get("seen_in_training"):
        md += ["", f"Warning: {len(result['seen_in_training'])} scored case(s) were seen in "
               "training or validation: " + ", ".join(result["seen_in_training"])]  # fmt: skip
    if overlay:
        md += [
            "",
            "Cases from the worst to the best Dice, on the slice with the most truth voxels "
            "(white: the truth's outline).",
            "",
            f"![overlays]({overlay})",
        ]
    md += ["", "| case | " + " | ".join(f"Dice {c}" for c in names) + " | mean | mean, lc |"]
    md.append("| --- " * (len(names) + 3) + "|")
    for case, row in sorted(result["per_case"].items()):
        cells = " | ".join(f"{row['dice_per_label'][c]:.3f}" for c in names)
        md.append(
            f"| {case} | {cells} | {row['mean_dice']:.3f} | "
            f"{row['largest_component']['mean_dice']:.3f} |"
        )
    return "\n".join(md) + "\n"
