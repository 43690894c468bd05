"""The run folder's report: report.json (machine-readable), report.md and PNG curves.

Every file is written to a temporary name and renamed, so an interrupted write never leaves
half a report over a good one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_report", "plot_curves", "format_markdown", "PLOTS"]

PLOTS = ("loss.png", "dice.png", "epsilon.png")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    ok = np.isfinite(values)
    v = np.where(ok, values, 0.0)
    kernel = np.ones(window)
    num = np.convolve(v, kernel, mode="full")[: len(v)]
    den = np.convolve(ok.astype(float), kernel, mode="full")[: len(v)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def plot_curves(out: Path, report: dict[str, Any]) -> list[Path]:
    """loss.png, dice.png and epsilon.png over training steps (a plot with no data says so)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    hist = report["history"]
    title = _title(report)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 3.6))
    loss = np.asarray([np.nan if v is None else v for v in hist["loss"]], dtype=float)
    steps = np.arange(1, len(loss) + 1)
    ax.plot(steps, loss, color="0.75", lw=0.8, label="per step")
    if len(loss):
        ax.plot(
            steps, _moving_average(loss, max(1, len(loss) // 20)), color="C0", label="moving mean"
        )
    ax.set(xlabel="step", ylabel="Dice + CE loss", title=title)
    ax.legend()
    paths.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if hist["dice"]:
        s, d = zip(*hist["dice"], strict=True)
        ax.plot(s, d, "o-", color="C2")
        ax.set_ylim(0, 1)
    else:
        ax.text(0.5, 0.5, "no validation cases", ha="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="validation Dice", title=title)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "dice.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if hist["epsilon"]:
        s, e = zip(*hist["epsilon"], strict=True)
        ax.plot(s, e, color="C3")
        ax.set(ylabel=f"epsilon (delta = {report['delta']:g})")
    else:
        ax.text(0.5, 0.5, "no DP: epsilon is infinite", ha="center", transform=ax.transAxes)
    ax.set(xlabel="step", title=title)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "epsilon.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _title(report: dict[str, Any]) -> str:
    if not report["dp"]:
        return "non-private"
    return (
        f"DP ({report['engine']}): sigma={report['noise_multiplier']:.3g}, "
        f"C={report['max_grad_norm']:g}"
    )


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec)


def _hd_text(row: dict[str, Any]) -> str:
    hd = row.get("hd95_mm") or []
    return ", ".join("inf" if h is None else f"{h:.1f}" for h in hd) or "n/a"


_SOURCE_PRIVACY = {True: "DP", False: "non-private"}  # None: a federated source's, unrecorded


def format_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    eps = "infinite (no DP)" if not report["dp"] else f"{report['epsilon']:.2f}"
    lines = [
        f"# dpseg train: {Path(cfg['data']).name}",
        "",
        "| | |",
        "| --- | --- |",
        f"| validation Dice (mean over {report['val_cases']} cases) | {_fmt(report['dice'])} |",
        f"| the same, each organ's largest component kept | "
        f"{_fmt(report.get('dice_largest_component'))} |",
        f"| epsilon | {eps} |",
        f"| delta | {_fmt(report['delta'], 'g')} |",
        f"| steps | {report['steps']} |",
        f"| training time | {report['seconds'] / 60:.1f} min ({report['seconds']:.0f} s) |",
        f"| device | {report['device']} |",
        f"| engine | {report['engine']} |",
    ]
    if report["dp"]:
        lines += [
            f"| noise multiplier / clip C | {report['noise_multiplier']:.4g} / "
            f"{report['max_grad_norm']:g} |",
            f"| Poisson sample rate / expected batch | {report['sample_rate']:.4f} / "
            f"{report['expected_batch']:.1f} patients |",
            f"| patches a sampled patient (averaged, clipped as one) | "
            f"{report.get('items_per_patient', 1)} |",
            f"| epsilon is per | {report.get('unit') or 'item'}, "
            f"{report.get('adjacency') or 'add/remove'} adjacency |",
            f"| accountant | {report['accountant']} |",
        ]
        if report.get("grad_sample_mode"):
            lines.append(f"| Opacus grad_sample_mode | {report['grad_sample_mode']} |")
    else:
        lines.append(
            f"| Poisson sample rate / expected batch | {report['sample_rate']:.4f} / "
            f"{report['expected_batch']:.1f} patients |"
        )
    lines += [
        f"| model | UNet{cfg['spatial_dims']}D channels {tuple(cfg['channels'])}, "
        f"{report['parameters']:,} parameters, {cfg['norm']} norm, {cfg['upsample']} up |",
        f"| patch / optimizer / lr | {cfg['patch']}^{cfg['spatial_dims']} / "
        f"{cfg['optimizer']} / {cfg['lr']:g} ({cfg.get('lr_schedule', 'constant')}) |",
        f"| cases (train / val) | {report['train_cases']} / {report['val_cases']} |",
    ]
    if report.get("resumed_from_step") is not None:
        lines.append(f"| resumed from step | {report['resumed_from_step']} |")
    init = report.get("init")
    if init:
        source = (
            f"trained on {init['source_data']} ({init['source_cases']} cases, "
            f"{_SOURCE_PRIVACY.get(init['source_dp'], 'privacy not recorded')})"
            if init["provenance"] == "recorded"
            else "provenance not recorded: the epsilon holds only if these weights saw none "
            "of this run's cases"
        )
        lines.append(
            f"| started from | {init['path']} (sha256 {init['sha256'][:12]}), {init['loaded']} "
            f"tensors loaded, {len(init['kept_fresh'])} fresh; {source} |"
        )
    for note in report.get("notes", []):
        lines.append(f"| note | {note} |")
    lines += ["", "![loss](loss.png) ![Dice](dice.png) ![epsilon](epsilon.png)", ""]
    if report.get("overlays"):
        lines += [
            "## Segmentations",
            "",
            "Validation cases from the worst to the best Dice, each on the slice with the most "
            "truth voxels: the image, the truth, the final model's prediction (white: the "
            "truth's outline).",
            "",
            f"![overlays]({report['overlays']})",
            "",
        ]
    if report["per_case"]:
        lines += [
            "## Validation cases",
            "",
            "Largest component: each organ's largest connected component kept "
            "(`dpseg predict --largest-component`).",
            "",
            "| case | Dice | HD95 (mm) | Dice, largest component | HD95, largest component |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in report["per_case"]:
            kept = row.get("largest_component") or {}
            lines.append(
                f"| {row['case']} | {row['dice']:.3f} | {_hd_text(row)} | "
                f"{_fmt(kept.get('dice'))} | {_hd_text(kept)} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_report(out: str | Path, report: dict[str, Any]) -> None:
    out = Path(out)
    report = _clean(report)
    _write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False))
    plot_curves(out, report)
    _write_text(out / "report.md", format_markdown(report))
