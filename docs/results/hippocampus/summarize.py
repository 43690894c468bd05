"""Tables of docs/results/hippocampus from the run folders run.sh wrote.

    .venv/bin/python docs/results/hippocampus/summarize.py [RUNS]   (default runs/hippocampus)

Writes tuning.md (every configuration tried, validation inside the 160 training cases) and
test.md (the final models on the 40 test cases, per label, with the paired bootstrap between
models where there are several), and copies each final run's report, plots, checkpoint and
test scores into docs/results/hippocampus/NAME/.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REFERENCE = {"1": 0.90, "2": 0.89}  # nnU-Net on the MSD test set (Isensee et al. 2021)
KEEP = ("report.json", "report.md", "loss.png", "dice.png", "epsilon.png", "overlays.png",
        "checkpoint.pt", "test.json", "test.md", "test_overlays.png")  # fmt: skip


def _cmd(run: Path) -> str:
    cmd = run.with_suffix(".cmd")
    return cmd.read_text().strip() if cmd.exists() else "?"


def _cpu_minutes(run: Path) -> str:
    """The process's user CPU time from the `time` line of NAME.log (training, loading and
    validation): steadier than wall time on a shared machine."""
    log = run.with_suffix(".log")
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("user"):
            m, s = line.split()[1].rstrip("s").split("m")
            return f"{int(m) + float(s) / 60:.1f}"
    return "?"


def _config(rep: dict) -> str:
    c = rep["config"]
    return (
        f"patch {c['patch']}, ch {','.join(map(str, c['channels']))}, batch {c['batch']}, "
        f"lr {c['lr']:g} {c['lr_schedule']}, {rep['steps']} steps"
        + (f", {c['optimizer']}" if c["optimizer"] != "adam" else "")
        + (f", norm {c.get('normalize', 'window')}" if c.get("normalize", "auto") != "auto" else "")
        + (f", p_fg {c['p_foreground']:g}" if c["p_foreground"] != 0.5 else "")
    )


def _paired(rep: dict, best: dict) -> str:
    """rep - best in validation Dice, mean over the shared validation cases +/- its standard
    error over cases (paired: both runs scored the same cases)."""
    a = {r["case"]: r["dice"] for r in rep["per_case"]}
    b = {r["case"]: r["dice"] for r in best["per_case"]}
    if rep is best or set(a) != set(b) or len(a) < 2:
        return "-"
    d = np.array([a[c] - b[c] for c in sorted(a)])
    return f"{d.mean():+.3f} +/- {d.std(ddof=1) / np.sqrt(len(d)):.3f}"


def tuning(runs: Path) -> list[str]:
    rows = []
    for rep_path in sorted((runs / "tune").glob("*/report.json")):
        rep = json.loads(rep_path.read_text())
        run = rep_path.parent
        rows.append((run.name, rep, _cmd(run)))
    best = max(rows, key=lambda r: r[1]["dice"])
    md = [
        "# Tuning the non-private 3-D baseline (validation inside the 160 training cases)",
        "",
        "Every configuration tried, in order. Validation: 32 cases drawn (seed 0) from inside "
        "the 160 training cases of split.json, the other 128 trained on; the 40 test cases were "
        "never loaded. Mean foreground Dice over the two labels, as predicted and with each "
        "label's largest connected component kept; against the best: the paired difference in "
        f"validation Dice to {best[0]} over the same 32 cases, +/- its standard error over "
        "cases. Minutes: training wall time at one thread on a shared 2-core machine (other "
        "jobs were running, so wall times vary by 2x for one configuration); CPU minutes: the "
        "process's user time (loading, training, validation).",
        "",
        "| run | configuration | parameters | val Dice | val Dice, largest comp. "
        "| against the best | minutes | CPU minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rep, _ in rows:
        md.append(
            f"| {name} | {_config(rep)} | {rep['parameters']:,} | {rep['dice']:.3f} | "
            f"{rep['dice_largest_component']:.3f} | {_paired(rep, best[1])} | "
            f"{rep['minutes']:.1f} | {_cpu_minutes(runs / 'tune' / name)} |"
        )
    md += ["", "## Commands", ""]
    for name, _, cmd in rows:
        md += [f"- {name}: `{cmd}`"]
    return md


def test_table(runs: Path) -> list[str]:
    sys.path.insert(0, str(HERE.parents[2]))
    from dpseg.train.scoring import compare_scores

    scores = {k: v for k, v in _scores(runs).items() if k in HEADLINE}
    md = [
        "# The final models on the 40 test cases",
        "",
        "Trained on all 160 training cases of split.json (no validation split; the "
        "configuration was chosen in tuning.md), scored with `dpseg evaluate --cases "
        "split.json:test`. Dice per label (1 anterior, 2 posterior) and their mean; lc: each "
        "label's largest connected component kept. Reference: nnU-Net, about 0.90 / 0.89 on "
        "the MSD test set (a different test set: the Decathlon's hidden one).",
        "",
        "| model | epsilon | Dice 1 | Dice 2 | mean | lc: Dice 1 | lc: Dice 2 | lc: mean |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in scores.items():
        lc = f["largest_component"]
        eps = "inf" if f["epsilon"] is None else f"{f['epsilon']:.2f}"
        md.append(
            f"| [{name}]({name}/test.md) | {eps} | {f['dice_per_label']['1']:.3f} | "
            f"{f['dice_per_label']['2']:.3f} | {f['mean_dice']:.3f} | "
            f"{lc['dice_per_label']['1']:.3f} | {lc['dice_per_label']['2']:.3f} | "
            f"{lc['mean_dice']:.3f} |"
        )
    pairs = _headline_pairs(list(scores))
    if pairs:
        md += [
            "",
            "Paired over the 40 test cases (A - B, mean Dice over labels; 95% percentile "
            "bootstrap interval, 10,000 resamples of cases): each model against the "
            "non-private one of its seed (seed 0's where that seed has none), each lever "
            "against DP from scratch at the same seed, and the two non-private seeds:",
            "",
            "| A | B | A - B | interval | lc: A - B | lc: interval |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for a, b in pairs:
            rows = [r for r in compare_scores(scores[a], scores[b]) if r["metric"] == "mean_dice"]
            md.append(f"| {a} | {b} | " + " | ".join(_gap(r) for r in rows) + " |")
    return md


def _headline_pairs(names: list[str]) -> list[tuple[str, str]]:
    """The comparisons a reader asks for, not every pair: DP against non-private, a lever
    (dpn, dpp) against DP from scratch at the same seed, and the non-private seeds."""
    pairs = []
    for name in names:
        kind, _, seed = name.rpartition("_s")
        if kind == "nodp":
            continue
        reference = f"nodp_s{seed}" if f"nodp_s{seed}" in names else "nodp_s0"
        if reference in names:
            pairs.append((name, reference))
        if kind != "dp" and f"dp_s{seed}" in names:
            pairs.append((name, f"dp_s{seed}"))
    if {"nodp_s0", "nodp_s1"} <= set(names):
        pairs.append(("nodp_s0", "nodp_s1"))
    return pairs


# the 160-case models of run.sh (dpn: DP at half the widths; dpp: DP from phantom pretraining)
HEADLINE = ("nodp_s0", "nodp_s1", "dp_s0", "dp_s1", "dpn_s0", "dpn_s1", "dpp_s0", "dpp_s1",
            "dpp_s2", "dp_s2")  # fmt: skip
SIZES = {40: "{}40_s{}", 80: "{}80_s{}", 160: "{}_s{}"}  # trend.sh's names, run.sh's at 160
# Retuned per size (trend.sh): the expected batch kept at 32 cases (q = 32 / N), sigma solved
# again; at 160 cases that is run.sh's own DP run.
RETUNED = {40: "dp40r_s{}", 80: "dp80r_s{}", 160: "dp_s{}"}


def trend_table(runs: Path) -> list[str]:
    """The DP gap on one site at 40, 80 and 160 training cases (nested subsets), per seed:
    non-private and DP mean Dice on the 40 test cases and the paired gap; trend.png."""
    sys.path.insert(0, str(HERE.parents[2]))
    from dpseg.train.scoring import paired_bootstrap

    scores = _scores(runs)
    md = [
        "",
        "## How the DP gap moves with the number of cases",
        "",
        "Nested subsets of split.json (trainN_sS: 40 of 80 of 160, per seed S), the final "
        "configurations of run.sh at every size (trend.sh): DP keeps q = 0.2, 300 steps and "
        "so sigma for epsilon 8, and its normaliser is q N. Mean Dice over the two labels on "
        "the 40 test cases; gap = non-private - DP, paired over the test cases (95% "
        "bootstrap interval). Retuned: the expected batch kept at 32 cases at every size (q "
        "= 0.8 at 40, 0.4 at 80, 0.2 at 160, where it is the same run), 300 steps, sigma "
        "solved again for epsilon 8; its change is retuned - DP, paired.",
        "",
        "| cases | seed | non-private | DP (epsilon 8) | gap | interval | DP retuned | "
        "change | interval |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    points: dict[int, list[tuple[float, float, float]]] = {}
    retuned: dict[int, list[float]] = {}
    for n, pattern in SIZES.items():
        for seed in (0, 1):
            a, b = scores.get(pattern.format("nodp", seed)), scores.get(pattern.format("dp", seed))
            if a is None or b is None:
                continue
            r = paired_bootstrap(a, b)
            points.setdefault(n, []).append((a["mean_dice"], b["mean_dice"], r["diff"]))
            row = (
                f"| {n} | {seed} | {a['mean_dice']:.3f} | {b['mean_dice']:.3f} | "
                f"{r['diff']:.3f} | [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |"
            )
            c = scores.get(RETUNED[n].format(seed))
            if c is None:
                row += " - | - | - |"
            elif c is b:
                row += f" {c['mean_dice']:.3f} | (the same run) | |"
                retuned.setdefault(n, []).append(c["mean_dice"])
            else:
                t = paired_bootstrap(c, b)
                row += (
                    f" {c['mean_dice']:.3f} | {t['diff']:+.3f} | "
                    f"[{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] |"
                )
                retuned.setdefault(n, []).append(c["mean_dice"])
            md.append(row)
    if points:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ns = sorted(points)
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for i, (label, color) in enumerate((("non-private", "C0"), ("DP, epsilon 8", "C3"))):
            for n in ns:
                ax.scatter([n] * len(points[n]), [p[i] for p in points[n]], color=color, s=14)
            mean = [sum(p[i] for p in points[n]) / len(points[n]) for n in ns]
            ax.plot(ns, mean, color=color, label=f"{label} (mean of seeds)")
        rs = [n for n in ns if n in retuned]
        if len(rs) > 1:
            for n in rs:
                ax.scatter([n] * len(retuned[n]), retuned[n], color="C1", s=14, marker="x")
            mean = [sum(retuned[n]) / len(retuned[n]) for n in rs]
            ax.plot(rs, mean, color="C1", ls="--", label="DP, retuned (mean of seeds)")
        ax.set_xlabel("training cases (one site)")
        ax.set_ylabel("test mean Dice")
        ax.set_xticks(ns)
        ax.set_ylim(0, 1)
        ax.legend(loc="center right", fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / "trend.png", dpi=120)
        plt.close(fig)
        md += ["", "![Dice against the number of cases](trend.png)"]
    return md


def _scores(runs: Path) -> dict[str, dict]:
    """Every scored model: NAME/test.json (dpseg train) and NAME/test_ENGINE.json (the global
    model of a dpseg federate run, named 'NAME ENGINE')."""
    out = {}
    for p in sorted(runs.glob("*/test*.json")):
        engine = p.stem.partition("_")[2]
        out[p.parent.name + (f" {engine}" if engine else "")] = json.loads(p.read_text())
    return out


def _alone_prefix(seed: int) -> str:
    """fed.sh's names of the sites trained alone with DP beside fed_sS (seed 0's came first)."""
    return "alone_site" if seed == 0 else f"alone_s{seed}_site"


def federated_table(runs: Path) -> list[str]:
    """Federated DP against federated non-private, and against each site alone with DP (and
    the mean of the three), paired over the 40 test cases, per seed (a seed also deals the
    cases to the sites)."""
    sys.path.insert(0, str(HERE.parents[2]))
    from dpseg.train.scoring import compare_scores

    scores = _scores(runs)
    fed = {k: v for k, v in scores.items() if k.startswith(("fed_", "alone_"))}
    if not fed:
        return []
    seeds = sorted({int(k.split()[0][len("fed_s") :]) for k in fed if k.startswith("fed_s")})
    md = ["", "## Federated: three sites simulated from one hospital", ""]
    means = {}
    for seed in seeds:
        alone = [v for k, v in fed.items() if k.startswith(_alone_prefix(seed))]
        if len(alone) > 1:
            means[seed] = f"mean of sites alone, seed {seed}"
            scores[means[seed]] = _mean_scores(alone)
    if means:
        md.append(
            "'mean of sites alone, seed S': each test case's Dice averaged over the models "
            "trained by one site alone with DP, beside fed_sS (the seed deals the cases to the "
            "sites: alone_siteK for seed 0, alone_sS_siteK for seed S; paired like any other "
            "model)."
        )
    md += [
        "",
        "| model | epsilon (largest over sites) | Dice 1 | Dice 2 | mean | lc: mean |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in fed.items():
        eps = "inf" if f["epsilon"] is None else f"{f['epsilon']:.2f}"
        md.append(
            f"| {name} | {eps} | {f['dice_per_label']['1']:.3f} | "
            f"{f['dice_per_label']['2']:.3f} | {f['mean_dice']:.3f} | "
            f"{f['largest_component']['mean_dice']:.3f} |"
        )
    for name in means.values():
        m = scores[name]["per_case"].values()
        md.append(
            f"| {name} | | | | {np.mean([c['mean_dice'] for c in m]):.3f} | "
            f"{np.mean([c['largest_component']['mean_dice'] for c in m]):.3f} |"
        )
    md += ["", "| A | B | A - B | interval | lc: A - B | lc: interval |",
           "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    pairs = []
    for seed in seeds:
        dp = f"fed_s{seed} dpseg"
        pairs += [(dp, f"fed_s{seed} none")]
        pairs += [(dp, means[seed])] if seed in means else []
        pairs += [(dp, k) for k in fed if k.startswith(_alone_prefix(seed))]
    for a, b in pairs:
        if a in scores and b in scores:
            rows = [r for r in compare_scores(scores[a], scores[b]) if r["metric"] == "mean_dice"]
            md.append(f"| {a} | {b} | " + " | ".join(_gap(r) for r in rows) + " |")
    return md


def _mean_scores(models: list[dict]) -> dict:
    """An F.json-shaped dict whose every per-case figure is the mean over ``models``."""

    def mean(rows):
        if isinstance(rows[0], dict):
            return {
                k: mean([r[k] for r in rows])
                for k in rows[0]
                if isinstance(rows[0][k], (dict, int, float))
            }
        return float(np.mean(rows))

    cases = models[0]["per_case"]
    return {"per_case": {c: mean([m["per_case"][c] for m in models]) for c in cases}}


def _gap(r: dict) -> str:
    return f"{r['diff']:+.3f} | [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"


def copy_finals(runs: Path) -> None:
    for run in sorted({p.parent for p in runs.glob("*/test*.json")}):
        dest = HERE / run.name
        dest.mkdir(exist_ok=True)
        keep = [
            *KEEP,
            *(p.name for p in run.glob("test_*")),
            *(p.name for p in run.glob("checkpoint_*.pt")),
        ]
        for name in keep:
            if (run / name).exists():
                shutil.copy2(run / name, dest / name)
        if run.with_suffix(".cmd").exists():
            shutil.copy2(run.with_suffix(".cmd"), dest / "command.txt")
        # test.md/F.json name the checkpoint where it was scored; point them at the copy
        for f in [*dest.glob("test*.json"), *dest.glob("test*.md")]:
            text = f.read_text()
            for where in sorted(
                {str(run), str(run.absolute()), str(run.resolve())}, key=len, reverse=True
            ):
                text = text.replace(where + "/", "")
            f.write_text(text)


def main() -> None:
    runs = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/hippocampus")
    wrote = []
    # A runs folder rebuilt from the committed finals has no tuning runs: keep tuning.md.
    if any((runs / "tune").glob("*/report.json")):
        (HERE / "tuning.md").write_text("\n".join(tuning(runs)) + "\n")
        wrote.append("tuning.md")
    if any(runs.glob("*/test*.json")):
        copy_finals(runs)
        md = test_table(runs) + federated_table(runs) + trend_table(runs)
        (HERE / "test.md").write_text("\n".join(md) + "\n")
        wrote.append("test.md")
    print(f"wrote {', '.join(wrote) or 'nothing'} in {HERE}")


if __name__ == "__main__":
    main()
