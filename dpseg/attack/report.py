"""The attack's run folder: report.json, report.md (the table) and attack.png (the figure).

The figure puts the original first, then each defence's reconstruction, then the
random-gradient baseline, one column each; 2D rows are the batch items, 3D rows are the
axial, coronal and sagittal slices through the centre of each item. Every panel shares the
intensity window [0, 1], so a washed-out reconstruction looks washed out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_figure", "save_path_figure", "write_report"]

_VIEWS = ("axial", "coronal", "sagittal")


def _views(volume: np.ndarray) -> list[np.ndarray]:
    """Centre slices of a canonical (R, A, S) volume, rotated so anterior/superior is up."""
    cx, cy, cz = (s // 2 for s in volume.shape)
    return [np.rot90(volume[:, :, cz]), np.rot90(volume[:, cy, :]), np.rot90(volume[cx, :, :])]


def save_figure(
    path: Path,
    original: torch.Tensor,
    recs: dict[str, torch.Tensor],
    scores: dict[str, float],
    title: str,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on CI and over ssh
    import matplotlib.pyplot as plt

    columns = [("original", original)] + list(recs.items())
    dims = original.dim() - 2
    rows: list[tuple[str, list[np.ndarray]]] = []
    for b in range(original.shape[0]):
        per_col = [t[b, 0].numpy() for _, t in columns]
        if dims == 2:
            rows.append((f"item {b}", [np.rot90(a) for a in per_col]))
        else:
            views = [_views(a) for a in per_col]
            rows += [(f"item {b} {v}", [vs[i] for vs in views]) for i, v in enumerate(_VIEWS)]
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(1.9 * len(columns), 1.9 * len(rows) + 0.5), squeeze=False
    )
    for r, (row_name, panels) in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                name = columns[c][0]
                ax.set_title(name if c == 0 else f"{name}\nSSIM {scores[name]:.2f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _undefended(report: dict) -> dict | None:
    """The report's row for the undefended update ("none"), if it was attacked."""
    return next((r for r in report["defences"] if r["name"] == "none"), None)


def save_path_figure(path: Path, report: dict) -> Path | None:
    """Gradient distance and SSIM along the path from the original to the undefended
    reconstruction (``experiment.path_profile``); None when the report has no path."""
    plain = _undefended(report)
    prof = plain.get("path") if plain is not None else None
    if prof is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(prof["t"], prof["grad_distance"], "o-", color="C0", label="gradient distance")
    ax.axhline(prof["grad_distance"][-1], color="C0", ls=":", lw=1)
    ax.set_xlabel("t  (image = original + t (reconstruction - original))")
    ax.set_ylabel("gradient distance (1 - cosine)", color="C0")
    twin = ax.twinx()
    twin.plot(prof["t"], prof["ssim"], "s--", color="C1", label="SSIM to the original")
    twin.set_ylabel("SSIM to the original", color="C1")
    twin.set_ylim(0.0, 1.02)
    ax.set_title(
        f"{report['case']} {report['dims']}D: from the original to the undefended reconstruction",
        fontsize=8,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    return "inf" if v == float("inf") else f"{v:.{digits}f}"


def markdown_table(report: dict) -> str:
    lines = [
        "| shared update | noise multiplier | SSIM | PSNR (dB) | MSE | grad distance "
        "| vs baseline |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["defences"]:
        verdict = (
            "no better"
            if row["no_better_than_baseline"]
            else f"+{row['ssim_over_baseline']:.2f} SSIM"
        )
        lines.append(
            f"| {row['name']} | {_fmt(row['noise_multiplier'], 2)} | {row['ssim']:.3f} | "
            f"{_fmt(row['psnr'], 2)} | {row['mse']:.4f} | {row['grad_distance']:.3f} | {verdict} |"
        )
    b = report["baseline"]
    lines.append(
        f"| random gradient (baseline) | - | {b['ssim']:.3f} | {_fmt(b['psnr'], 2)} | "
        f"{b['mse']:.4f} | {b['grad_distance']:.3f} | - |"
    )
    return "\n".join(lines)


def _floor_lines(report: dict) -> list[str]:
    """One paragraph: how well the undefended update was matched, against how well the
    update of an image indistinguishable from the original matches it."""
    floor = report.get("matching_floor")
    plain = _undefended(report)
    if floor is None:
        return []
    reached = (
        f" The undefended reconstruction reached {plain['grad_distance']:.4f}"
        + (
            ": at or below the floor, so the update is matched as closely as an image "
            "indistinguishable from the original matches it, and what the reconstruction still "
            "gets wrong is not pinned down at that distance."
            if plain["grad_distance"] <= floor["grad_distance"]
            else ": above the floor, so it is not yet matched as closely as a near-copy of the "
            "original matches it."
        )
        if plain is not None
        else ""
    )
    return [
        f"Matching floor: the original plus Gaussian noise of std {floor['noise_std']} "
        f"(SSIM {floor['ssim']:.3f}) is at gradient distance {floor['grad_distance']:.4f} "
        f"from the undefended update.{reached}",
        "",
        *(
            [
                f"Mask-only reference: the mask painted with the original's mean intensity "
                f"inside and outside it scores SSIM {report['mask_reference']['ssim']:.3f}.",
                "",
            ]
            if "mask_reference" in report
            else []
        ),
    ]


def _path_lines(report: dict) -> list[str]:
    """One paragraph on the straight path from the original to the undefended
    reconstruction (``experiment.path_profile``)."""
    plain = _undefended(report)
    path = plain.get("path") if plain is not None else None
    if path is None:
        return []
    top = max(range(len(path["t"])), key=lambda i: path["grad_distance"][i])
    if path["basin_t"] is None:
        verdict = (
            "The reconstruction matches the update better than the original does (a defended "
            "or noisy update)."
        )
    elif path["barrier"] <= 1e-6:
        verdict = (
            "The distance does not rise above the reconstruction's on the way: along this "
            "line the reconstruction and the original lie in one valley."
        )
    else:
        verdict = (
            f"It peaks at {path['grad_distance'][top]:.4f} (t = {path['t'][top]}) and falls "
            f"back to {path['grad_distance'][-1]:.4f} at the reconstruction: a ridge "
            "separates the reconstruction from the original. Images on the line up to "
            f"t = {path['basin_t']} match the update at least as well and score SSIM "
            f">= {path['basin_ssim']:.3f}, so the optimiser stopped short, not the update."
        )
    return [
        "Path from the original (t = 0) to the undefended reconstruction (t = 1), gradient "
        "distance: "
        + ", ".join(
            f"{t}: {max(d, 0.0):.4f}"  # 1 - cosine is >= 0; float32 can give -1e-8
            for t, d in zip(path["t"], path["grad_distance"], strict=True)
        )
        + f". {verdict}",
        "",
    ]


def write_report(out: Path, report: dict, command: str) -> None:
    out = Path(out)
    # JSON has no infinity: an exact reconstruction's PSNR is written as null.
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2))
    m = report["model"]
    inv = report["inversion"]
    text = [
        f"# Gradient inversion: {report['case']}, {report['dims']}D, patch {report['patch']}, "
        f"batch {report['batch']}",
        "",
        f"Command: `{command}`",
        "",
        f"Model: U-Net channels {m['channels']} ({m['parameters']:,} parameters), "
        f"{m['train_steps']} training steps before the attack. Shared: {report['setting']}. "
        f"Attack: {inv['iterations']} iterations x {inv['restarts']} restarts, lr {inv['lr']}, "
        f"TV weight {inv['tv_weight']}, mask {inv['mask']}. Total {report['seconds']} s.",
        "",
        markdown_table(report),
        "",
        f"SSIM/PSNR on the intensity window [0, 1] (data range {report['data_range']}). "
        f"'no better' = SSIM within {report['baseline_margin']} of the attack fed a random "
        "gradient (isotropic Gaussian, the undefended update's norm).",
        "",
        *_floor_lines(report),
        *_path_lines(report),
        "![reconstructions](attack.png)",
        *(["", "![path](path.png)"] if "path_figure" in report else []),
        "",
    ]
    (out / "report.md").write_text("\n".join(text))
