"""Collects the runs behind docs/results/federated_dp (see run.sh) into this folder: each
run's report.json and report.md as `dpseg federate` wrote them, its plots redrawn from the
report, and summary.json / summary.md with the comparisons that give the result its meaning
(DP against non-private per held-out patient on both seeds, each site alone, client-level
DP, the time penalty).

    .venv/bin/python docs/results/federated_dp/summarize.py /tmp/fs
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from dpseg.federated.report import final_cases, paired_gap, write_plots

HERE = Path(__file__).resolve().parent
RUNS = ["s0", "s1", "alone_site0", "alone_site1", "alone_site2", "client", "penalty"]


def _wall(src: Path, name: str) -> str | None:
    """`real` of bash's `time` around the run (run.sh writes it to NAME.time)."""
    t = src / f"{name}.time"
    if not t.exists():
        return None
    for line in t.read_text().splitlines():
        if line.startswith("real"):
            return line.split()[1]
    return None


def _gap_text(g: dict) -> str:
    return f"{g['gap']:+.3f} +/- {g['se']:.3f}"


def main(src: Path) -> None:
    reports, walls, commands = {}, {}, {}
    for name in RUNS:
        run = src / name
        if not (run / "report.json").exists():
            print(f"{name}: no report yet, left out")
            continue
        dst = HERE / name
        dst.mkdir(exist_ok=True)
        shutil.copy(run / "report.json", dst / "report.json")
        shutil.copy(run / "report.md", dst / "report.md")
        report = json.loads((run / "report.json").read_text())
        write_plots(report, dst)
        reports[name], walls[name] = report, _wall(src, name)
        cmd = src / f"{name}.cmd"
        commands[name] = cmd.read_text().strip().replace(str(src), "runs") if cmd.exists() else None

    md = ["# Federated DP at epsilon 8, at scale: the figures", ""]
    summary: dict = {"runs": {}}
    md += [
        "| run | engine | pooled Dice | largest component kept | max epsilon | s / round | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in reports.items():
        for e in r["engines"]:
            pd, lc = r["pooled_dice"][e], r["pooled_dice_largest_component"][e]
            eps = r["max_epsilon"][e]
            if r.get("client_epsilon", {}).get(e) is not None:
                eps = r["client_epsilon"][e]
                e_label = f"{e} + client-level DP"
            else:
                e_label = e
            sec = r["seconds_per_round"][e]
            md.append(
                f"| {name} | {e_label} | {_f(pd)} | {_f(lc)} | {_f(eps, '.2f')} | "
                f"{_f(sec, '.1f')} | {walls[name] or '-'} |"
            )
            summary["runs"].setdefault(name, {})[e] = {
                "pooled_dice": pd, "pooled_dice_largest_component": lc, "epsilon": eps,
                "seconds_per_round": sec, "wall": walls[name], "command": commands[name],
            }  # fmt: skip

    md += ["", "## DP against non-private federated training, per held-out patient", ""]
    md += [
        "| seed | cases | Dice gap (SE) | won / lost | largest component: gap (SE) | won / lost |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("s0", "s1"):
        if name in reports and "paired" in reports[name]:
            p = reports[name]["paired"]["dpseg"]
            a, b = p["dice"], p["dice_largest_component"]
            md.append(
                f"| {reports[name]['config']['seed']} | {a['cases']} | {_gap_text(a)} | "
                f"{a['ours_better']} / {a['base_better']} | {_gap_text(b)} | "
                f"{b['ours_better']} / {b['base_better']} |"
            )
            summary[f"paired_{name}"] = p

    if "s0" in reports:
        fed = final_cases(reports["s0"], "dpseg")
        rows = []
        for k in range(3):
            name = f"alone_site{k}"
            if name not in reports:
                continue
            alone = final_cases(reports[name], "dpseg")
            g = paired_gap(fed, alone, 1)
            own = {c for c in reports[name]["sites"][f"site{k}"]["cases"]["test"]}
            g_own = paired_gap({c: v for c, v in fed.items() if c in own}, alone, 1)
            rows.append((name, reports[name], g, g_own))
            summary[f"federated_minus_{name}"] = {"all_sites": g, "own_site": g_own}
        if rows:
            md += [
                "",
                "## What federating buys: each site alone, DP at the same epsilon",
                "",
                "Federated DP (seed 0) minus the site trained alone, largest component kept, "
                "per held-out patient: on every site's patients, and on the site's own.",
                "",
                "| site alone | its pooled Dice (lc) | epsilon | federated - alone, all | "
                "federated - alone, own patients |",
                "|---|---|---|---|---|",
            ]
            for name, r, g, g_own in rows:
                md.append(
                    f"| {name} | {_f(r['pooled_dice_largest_component']['dpseg'])} | "
                    f"{_f(r['max_epsilon']['dpseg'], '.2f')} | {_gap_text(g)} ({g['cases']}) | "
                    f"{_gap_text(g_own)} ({g_own['cases']}) |"
                )

    if "penalty" in reports:
        md += [
            "",
            "## The training-time penalty at this scale",
            "",
            "| engine | s / round | x none | CPU s / round | x none | fastest round x none |",
            "|---|---|---|---|---|---|",
        ]
        for e, p in reports["penalty"]["penalty"].items():
            md.append(
                f"| {e} | {_f(p['seconds_per_round'], '.1f')} | {_f(p['time_ratio'], '.2f')} | "
                f"{_f(p['cpu_seconds_per_round'], '.1f')} | {_f(p['cpu_time_ratio'], '.2f')} | "
                f"{_f(p['fastest_ratio'], '.2f')} |"
            )
        summary["penalty"] = reports["penalty"]["penalty"]

    if any(n in reports for n in ("s0", "s1")):
        md += ["", "![per patient](paired.png)"]
        _paired_plot(reports)

    md += ["", "## Commands", ""]
    for name, cmd in commands.items():
        md += [f"- {name} ({walls[name] or '-'}): `{cmd}`"]
    (HERE / "summary.md").write_text("\n".join(md) + "\n")
    (HERE / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(md))


def _paired_plot(reports: dict) -> None:
    """DP against non-private, one point per held-out patient (largest component kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    for name, color in (("s0", "#1b9e77"), ("s1", "#7570b3")):
        if name not in reports:
            continue
        dp, base = final_cases(reports[name], "dpseg"), final_cases(reports[name], "none")
        cases = sorted(set(dp) & set(base))
        seed = reports[name]["config"]["seed"]
        ax.scatter([base[c][1] for c in cases], [dp[c][1] for c in cases], s=10, alpha=0.6,
                   color=color, label=f"seed {seed}")  # fmt: skip
    lo = 0.6
    ax.plot([lo, 1], [lo, 1], color="#999999", lw=1)
    ax.set(xlim=(lo, 1), ylim=(lo, 1), xlabel="non-private Dice (largest component)",
           ylabel="DP Dice at epsilon 8 (largest component)",
           title="Each held-out patient, federated")  # fmt: skip
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "paired.png", dpi=120)
    plt.close(fig)


def _f(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fs"))
