"""The audit's run folder: report.json, report.md and epsilon.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpseg.audit.auditor import AuditResult


def verdict(r: AuditResult) -> str:
    if r.epsilon_claimed is None:
        return "no claim (no noise)"
    if r.epsilon_lower > r.epsilon_claimed:
        return "LEAKS: measured above the claim"
    return "ok"


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "inf"
    return f"{value:.{digits}f}"


def markdown(results: list[AuditResult], command: str, environment: dict) -> str:
    lines = [
        "# Privacy audit",
        "",
        f"`{command}`",
        "",
        "Each trial is one slot of the canary model in one run of dpseg's real DP step: a Dirac "
        "canary (gradient 4C in one coordinate) present (world 1) or absent (world 0). "
        "epsilon_lower is a lower bound on the epsilon the released updates leak, at the "
        "stated confidence (Clopper-Pearson on the false positive and negative rates, "
        "threshold chosen on a held-out quarter of the trials); epsilon_claimed is the "
        "engine's own accountant for the same noise, sample rate and steps. A lower bound "
        "above the claim means the engine leaks more than it says. The Gaussian-DP "
        "estimate (Nasr et al. 2023) assumes a Gaussian trade-off curve (exact for one step "
        "without subsampling).",
        "",
        "| sigma | steps | q | backend | path | trials / world | epsilon claimed | "
        "epsilon lower (95%) | lower / claimed | GDP estimate | seconds | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r.epsilon_lower / r.epsilon_claimed:.2f}" if r.epsilon_claimed else "-"
        lines.append(
            f"| {r.noise_multiplier:g} | {r.steps} | {r.sample_rate:g} | {r.backend} | {r.path} "
            f"| {r.trials:,} | {_fmt(r.epsilon_claimed)} | {r.epsilon_lower:.2f} | {ratio} "
            f"| {r.epsilon_gdp:.2f} | {r.seconds:.0f} | {verdict(r)} |"
        )
    lines += [
        "",
        f"delta {results[0].delta:g}, confidence {results[0].confidence:g}, accountant "
        f"{results[0].accountant}. Machine: {environment.get('device', '?')}, torch "
        f"{environment.get('torch', '?')}, commit {environment.get('commit', '?')}.",
        "",
        "![epsilon](epsilon.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results: list[AuditResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in results if r.epsilon_claimed is not None]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    top = max([r.epsilon_claimed for r in finite] + [r.epsilon_lower for r in finite] + [1.0])
    top *= 1.15
    ax.plot([0, top], [0, top], color="0.6", lw=1, ls="--", label="lower = claimed")
    ax.fill_between([0, top], [0, top], [top, top], color="C3", alpha=0.08, lw=0)
    ax.text(0.04 * top, 0.9 * top, "leaks: measured above the claim", color="C3", fontsize=8)
    for r in finite:
        ax.scatter(r.epsilon_claimed, r.epsilon_lower, color="C0", zorder=3)
        ax.annotate(
            f"sigma {r.noise_multiplier:g}, {r.backend}, {r.path.replace('_', ' ')}",
            (r.epsilon_claimed, r.epsilon_lower),
            textcoords="offset points", xytext=(-6, 6), ha="right", fontsize=7,
        )  # fmt: skip
    noiseless = [r for r in results if r.epsilon_claimed is None]
    if noiseless:
        ax.set_title(
            "no noise: lower bound "
            + ", ".join(f"{r.epsilon_lower:.1f}" for r in noiseless)
            + " (claim infinite)",
            fontsize=8,
        )
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("epsilon claimed (accountant)")
    ax.set_ylabel("epsilon lower bound (audit, 95%)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, results: list[AuditResult], command: str, environment: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    audits = []
    for r in results:
        d = r.as_dict()
        for k, v in d.items():  # JSON has no infinity: a bound of inf is reported as null
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        audits.append(d)
    report = {"command": command, "environment": environment, "audits": audits}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(results, command, environment))
    plot(results, out / "epsilon.png")
