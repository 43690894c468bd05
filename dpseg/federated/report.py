"""RUN/report.json, RUN/report.md and the PNG plots of a federated run.

report.json (one shape whether one engine ran or several):

- "rounds": one record per engine and round: {"round", "engine", "sites": {site: {"dice",
  "epsilon", "seconds", "steps", "status", ...}}, "pooled_dice", "seconds" (training and
  aggregation wall time of the round), "eval_seconds", "client_epsilon" (client-level DP)}.
- "sites": {site: {"train_cases", "test_cases", "noise_multiplier", "sample_rate",
  "dice": {engine: final}, "epsilon": {engine: final}, "status": {engine: ...}}}.
- "seconds_per_round": {engine: median over rounds} (the median, since other jobs share
  the CPU and one slow round should not move the figure).
- "paired" (with "none" among the engines): {engine: {"dice": ..., "dice_largest_component":
  ..., "round"}}, each ``paired_gap`` at the last round both evaluated: the mean
  per-case difference, its standard error over cases, and the cases each side won.
- "refused_updates": [{"engine", "round", "site", "reason"}] each update the server refused
  (update_checks.py); "refused_rounds": [{"engine", "round", "reason"}] each round it refused
  whole (the model kept as it was).
- "outside_epsilon": {"figures", "note"}: what in the report is computed from the sites'
  patients without DP noise, so not covered by their epsilon, and why it is there.
- "penalty" (with two engines or more): {engine: {"seconds_per_round", "time_ratio",
  "final_dice", "dice_ratio", "max_epsilon"}}, ratios to "none" (null without it).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

__all__ = [
    "build_report", "final_cases", "paired_gap", "summary_lines", "write_markdown", "write_plots",
    "write_report",
]  # fmt: skip

_COLORS = {"none": "#4d4d4d", "dpseg": "#1b9e77", "opacus": "#d95f02"}


def _fmt(x, spec=".3f", missing="-") -> str:
    return missing if x is None else format(x, spec)


def build_report(cfg, sims: dict, sites, sigmas: dict, env: dict) -> dict:
    engines = list(sims)
    rounds, seconds, cpu, fastest, pooled, pooled_lc, max_eps, client_eps, done = (
        [], {}, {}, {}, {}, {}, {}, {}, {},
    )  # fmt: skip
    site_info = {}
    for s in sites:
        sim_site = next(iter(sims.values())).sites[[x.name for x in sites].index(s.name)]
        # A Flower site sends its case counts only under --share-site-stats, its case
        # names never: unknown here, they are None.
        train, test = _count(s.train_images), _count(s.test_images)
        site_info[s.name] = {
            "train_cases": train, "test_cases": test,
            "noise_multiplier": sigmas[s.name], "sample_rate": sim_site.sample_rate,
            "expected_batch": train * sim_site.sample_rate if train is not None else None,
            "cases": s.cases or None, "dice": {}, "dice_largest_component": {}, "epsilon": {},
            "status": {},
        }  # fmt: skip
    for engine, sim in sims.items():
        for rec in sim.history:
            rounds.append({"engine": engine, **rec})
        hist = sim.history
        seconds[engine] = statistics.median(r["seconds"] for r in hist) if hist else None
        cpu[engine] = statistics.median(r["cpu_seconds"] for r in hist) if hist else None
        fastest[engine] = min(r["seconds"] for r in hist) if hist else None
        pooled[engine] = hist[-1].get("pooled_dice") if hist else None
        pooled_lc[engine] = hist[-1].get("pooled_dice_largest_component") if hist else None
        done[engine] = sim.round
        eps = [s.epsilon for s in sim.sites if s.epsilon is not None]
        max_eps[engine] = max(eps) if eps else None
        if sim.server_ledger is not None:
            client_eps[engine] = sim.server_ledger.epsilon
        for site in sim.sites:
            info = site_info[site.name]
            last = hist[-1]["sites"][site.name] if hist else {}
            info["dice"][engine] = last.get("dice")
            info["dice_largest_component"][engine] = last.get("dice_largest_component")
            info["epsilon"][engine] = site.epsilon
            failures = sum(r["sites"][site.name]["status"] == "failed" for r in hist)
            info["status"][engine] = site.exhausted or (
                "training" + (f" ({failures} failed round(s))" if failures else "")
            )
    # An engine stopped early for timing (cfg.engine_rounds) has no final Dice to compare.
    full = max(done.values()) if done else 0
    timing_only = [e for e in engines if done[e] < full and e in cfg.engine_rounds]
    for e in timing_only:
        pooled[e] = pooled_lc[e] = None
        for info in site_info.values():
            info["dice"][e] = info["dice_largest_component"][e] = None
    report = {
        "config": asdict(cfg),
        "environment": env,
        "outside_epsilon": outside_epsilon(cfg, env.get("runtime", "simulator")),
        "engines": engines,
        "rounds_done": done,
        "rounds": rounds,
        "sites": site_info,
        "seconds_per_round": seconds,
        "cpu_seconds_per_round": cpu,
        "fastest_round_seconds": fastest,
        "pooled_dice": pooled,
        "pooled_dice_largest_component": pooled_lc,
        "timing_only": {e: done[e] for e in timing_only},
        "max_epsilon": max_eps,
        "delta": cfg.delta,
        # update_checks.py: each update the server refused, and each round it refused whole.
        "refused_updates": [
            {"engine": r["engine"], "round": r["round"], **x}
            for r in rounds
            for x in r.get("refused", [])
        ],
        "refused_rounds": [
            {"engine": r["engine"], "round": r["round"], "reason": r["refused_round"]}
            for r in rounds
            if r.get("refused_round")
        ],
    }
    if client_eps:
        report["client_epsilon"] = client_eps
    if "none" in engines and "none" not in timing_only:
        # Each engine against non-private training, case by case, at the last round both
        # evaluated (with --eval-every, or a site stopped by its budget, they can differ).
        paired = {}
        for e in engines:
            if e == "none" or e in timing_only:
                continue
            common = _evaluated_rounds(report, e) & _evaluated_rounds(report, "none")
            if common:
                r = max(common)
                ours, base = final_cases(report, e, r), final_cases(report, "none", r)
                paired[e] = {
                    "round": r,
                    "dice": paired_gap(ours, base, 0),
                    "dice_largest_component": paired_gap(ours, base, 1),
                }
        if paired:
            report["paired"] = paired
    if len(engines) > 1:
        base_t, base_c, base_d = seconds.get("none"), cpu.get("none"), pooled.get("none")
        base_f = fastest.get("none")
        report["penalty"] = {
            e: {
                "seconds_per_round": seconds[e],
                "time_ratio": seconds[e] / base_t if base_t and seconds[e] else None,
                "cpu_seconds_per_round": cpu[e],
                "cpu_time_ratio": cpu[e] / base_c if base_c and cpu[e] else None,
                # The fastest round: the least disturbed by other jobs on a shared machine.
                "fastest_round_seconds": fastest[e],
                "fastest_ratio": fastest[e] / base_f if base_f and fastest[e] else None,
                "final_dice": pooled[e],
                "dice_ratio": pooled[e] / base_d if base_d and pooled[e] is not None else None,
                "max_epsilon": max_eps[e],
            }
            for e in engines
        }
    return report


def _count(images) -> int | None:
    return None if images is None else len(images)


# What a report holds that is computed from the sites' patients without DP noise.
_UNNOISED = [
    "training loss (rounds[].sites[].loss)",
    "held-out Dice: per site, pooled and per case (rounds[].sites[].dice*, "
    "rounds[].pooled_dice*, rounds[].cases, sites[].dice*, pooled_dice*, paired)",
    "case counts (sites[].train_cases, test_cases, expected_batch)",
    "timings of the sites' training (rounds[].sites[].seconds, cpu_seconds)",
]


def outside_epsilon(cfg, runtime: str) -> dict:
    """Which figures of the report the sites' epsilon does not cover, and why they are
    there: in-process nothing left a site; on Flower the sites sent them only under
    --share-site-stats (case names never: per-case Dice comes under "site/k" keys)."""
    if runtime == "flower" and not getattr(cfg, "share_site_stats", False):
        return {
            "figures": [],
            "note": "each site sent only its DP update, its epsilon and public settings "
            "(sampling rate, noise multiplier, steps); it kept its loss and its evaluation "
            "on its own disk",
        }
    note = (
        "sent by the sites because of --share-site-stats"
        if runtime == "flower"
        else "computed in this one process, where nothing leaves a site"
    )
    figures = _UNNOISED + ([] if runtime == "flower" else ["case names (sites[].cases)"])
    return {"figures": figures, "note": f"computed from patients without DP noise; {note}"}


def _evaluated_rounds(report: dict, engine: str) -> set[int]:
    return {r["round"] for r in report["rounds"] if r["engine"] == engine and r.get("cases")}


def final_cases(report: dict, engine: str, at_round: int | None = None) -> dict | None:
    """{case: [dice, dice with the largest component]} of the engine's last evaluation (or
    of the given round's)."""
    for rec in reversed(report["rounds"]):
        if rec["engine"] == engine and rec.get("cases"):
            if at_round is None or rec["round"] == at_round:
                return rec["cases"]
    return None


def paired_gap(ours: dict, base: dict, column: int = 1) -> dict:
    """Mean over the held-out cases both scored of (ours - base), with its standard error
    over cases (the cases, not the voxels, are the independent units: patients), and how
    many cases each side won. ``column`` 0: Dice as predicted, 1: largest component kept."""
    names = sorted(set(ours) & set(base))
    if not names:
        raise ValueError("the two runs scored no held-out case in common")
    d = [float(ours[n][column]) - float(base[n][column]) for n in names]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None
    return {
        "cases": len(d), "gap": mean, "se": se,
        "ours": statistics.fmean(float(ours[n][column]) for n in names),
        "base": statistics.fmean(float(base[n][column]) for n in names),
        "ours_better": sum(x > 0 for x in d), "base_better": sum(x < 0 for x in d),
    }  # fmt: skip


def summary_lines(report: dict) -> list[str]:
    engines = report["engines"]
    lines = ["", f"Final Dice and epsilon (delta = {report['delta']:g}) per site:"]
    head = f"{'site':<10}" + "".join(f"{e + ' dice':>13}{e + ' eps':>12}" for e in engines)
    lines.append(head)
    for name, info in report["sites"].items():
        row = f"{name:<10}"
        for e in engines:
            row += f"{_fmt(info['dice'][e]):>13}{_fmt(info['epsilon'][e], '.2f'):>12}"
        lines.append(row)
    row = f"{'pooled':<10}"
    for e in engines:
        row += f"{_fmt(report['pooled_dice'][e]):>13}{_fmt(report['max_epsilon'][e], '.2f'):>12}"
    lines.append(row + "   (epsilon: the largest over sites)")
    if any(v is not None for v in report.get("pooled_dice_largest_component", {}).values()):
        row = f"{'pooled, lc':<10}"
        for e in engines:
            row += f"{_fmt(report['pooled_dice_largest_component'][e]):>13}{'':>12}"
        lines.append(row + "   (each organ's largest connected component kept)")
    for name, info in report["sites"].items():
        for e in engines:
            if not info["status"][e].startswith("training"):
                lines.append(f"{e} {name}: {info['status'][e]}")
    if "penalty" in report:
        lines += ["", "Training-time penalty (median seconds per round, ratios to none):"]
        lines.append(
            f"{'engine':<10}{'s/round':>10}{'time x':>9}{'cpu s':>9}{'cpu x':>8}"
            f"{'fastest s':>11}{'x':>7}{'final dice':>12}{'dice x':>9}"
        )
        for e, p in report["penalty"].items():
            lines.append(
                f"{e:<10}{_fmt(p['seconds_per_round'], '.2f'):>10}{_fmt(p['time_ratio'], '.2f'):>9}"
                f"{_fmt(p['cpu_seconds_per_round'], '.2f'):>9}{_fmt(p['cpu_time_ratio'], '.2f'):>8}"
                f"{_fmt(p['fastest_round_seconds'], '.2f'):>11}{_fmt(p['fastest_ratio'], '.2f'):>7}"
                f"{_fmt(p['final_dice']):>12}{_fmt(p['dice_ratio'], '.2f'):>9}"
            )
        for e, n in report.get("timing_only", {}).items():
            lines.append(f"{e}: {n} round(s) for its time per round only; its Dice is not final")
        for e, p in report.get("paired", {}).items():
            lines.append(f"{e} - none, paired over held-out cases: " + _paired_text(p))
    else:
        e = engines[0]
        lines.append(f"{e}: {_fmt(report['seconds_per_round'][e], '.2f')} s per round (median)")
    return lines + refusal_lines(report)


def refusal_lines(report: dict) -> list[str]:
    lines = [
        f"{x['engine']} round {x['round']}: the update of {x['site']} was refused ({x['reason']})"
        for x in report.get("refused_updates", [])
    ]
    lines += [
        f"{x['engine']} round {x['round']} was refused, the model kept ({x['reason']})"
        for x in report.get("refused_rounds", [])
    ]
    return lines


def _paired_text(p: dict) -> str:
    def one(g: dict) -> str:
        se = f" +/- {g['se']:.3f}" if g["se"] is not None else ""
        return f"{g['gap']:+.3f}{se} ({g['cases']} cases)"

    return f"Dice {one(p['dice'])}, largest component kept {one(p['dice_largest_component'])}"


def write_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    engines, sites = report["engines"], list(report["sites"])
    by = {e: [r for r in report["rounds"] if r["engine"] == e] for e in engines}
    styles = ["-", "--", ":", "-."]
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in engines:
        rs = [r for r in by[e] if r.get("pooled_dice") is not None]  # the evaluated rounds
        x = [r["round"] for r in rs]
        ax.plot(
            x, [r["pooled_dice"] for r in rs], "o-", color=_COLORS.get(e), label=f"{e} (pooled)",
            lw=2,
        )  # fmt: skip
        if any(r.get("pooled_dice_largest_component") is not None for r in rs):
            ax.plot(
                x, [r.get("pooled_dice_largest_component") for r in rs], "s:",
                color=_COLORS.get(e), label=f"{e} (largest component kept)", lw=1.5, ms=4,
            )  # fmt: skip
        for name in sites:
            ax.plot(
                x,
                [r["sites"][name].get("dice") for r in rs],
                color=_COLORS.get(e),
                lw=0.8,
                alpha=0.5,
                ls="--",
            )
    ax.set(xlabel="round", ylabel="Dice (held-out cases)", title="Dice per round (thin: per site)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(out / "dice_per_round.png", dpi=120)
    plt.close(fig)
    files.append("dice_per_round.png")

    private = [
        e for e in engines if any(r["sites"][sites[0]].get("epsilon") is not None for r in by[e])
    ]
    if private:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, e in enumerate(private):
            for j, name in enumerate(sites):
                rs = by[e]
                ax.plot([r["round"] for r in rs], [r["sites"][name].get("epsilon") for r in rs],
                        ls=styles[i % len(styles)], marker="o", ms=3, color=f"C{j}",
                        label=f"{name} ({e})")  # fmt: skip
        if report["config"].get("max_epsilon"):
            ax.axhline(
                report["config"]["max_epsilon"], color="k", lw=0.8, ls=":", label="--max-epsilon"
            )
        ax.set(
            xlabel="round",
            ylabel=f"epsilon (delta={report['delta']:g})",
            title="Privacy spent per site",
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.savefig(out / "epsilon_per_round.png", dpi=120)
        plt.close(fig)
        files.append("epsilon_per_round.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in engines:
        rs = by[e]
        ax.plot(
            [r["round"] for r in rs],
            [r["seconds"] for r in rs],
            "o-",
            color=_COLORS.get(e),
            label=e,
        )
    ax.set(xlabel="round", ylabel="seconds (local training + aggregation)", title="Time per round")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(out / "seconds_per_round.png", dpi=120)
    plt.close(fig)
    files.append("seconds_per_round.png")
    return files


def write_markdown(report: dict, out: Path, images: list[str]) -> None:
    cfg, env, engines = report["config"], report["environment"], report["engines"]
    data = (
        f"{cfg['phantoms']} phantoms ({cfg['size']}^3)" if cfg.get("phantoms") else cfg.get("data")
    )
    local = (f"{cfg['local_steps']} local steps" if cfg.get("local_steps") is not None
             else f"{cfg['local_epochs']} local epochs")  # fmt: skip
    md = [
        "# Federated run",
        "",
        f"{len(report['sites'])} sites from {data}; {cfg['strategy']}, "
        f"{max(report['rounds_done'].values())} rounds of {local}, fraction {cfg['fraction']}; "
        + (
            f"2-D U-Net {tuple(cfg['channels'])} ({cfg['upsample']} upsampling) on "
            f"{cfg['patch']}^2 axial slices, "
            if cfg.get("spatial_dims", 3) == 2
            else f"U-Net {tuple(cfg['channels'])} ({cfg['upsample']} upsampling), "
            f"{cfg['patch']}^3 patches, "
        )
        + _sampling_text(cfg)
        + f"{cfg['optimizer']} lr {cfg['lr']}"
        + (f" (DP engines {cfg['dp_lr']})" if cfg.get("dp_lr") else "")
        + (
            f", {cfg['lr_schedule']} over rounds"
            if cfg.get("lr_schedule", "constant") != "constant"
            else ""
        )
        + (
            f", epsilon solved for {cfg['target_epsilon']:g} per site"
            if cfg.get("target_epsilon")
            else ""
        )
        + "; "
        f"DP-SGD C = {cfg['max_grad_norm']}, delta = {cfg['delta']:g}, "
        f"{_accountant_text(cfg)}; "
        f"Opacus in {cfg['opacus_mode']} mode.",
        "",
        f"Machine: {env.get('device')}, {env.get('threads')} threads, torch {env.get('torch')}, "
        f"opacus {env.get('opacus')}, commit {env.get('commit')}, {env.get('date')}"
        + (
            f", load average at start {env['load_average_at_start'][0]:.1f}"
            if env.get("load_average_at_start")
            else ""
        ),
        "",
        "## Final Dice and epsilon per site",
        "",
        "| site | train / test cases | sigma | q | "
        + " | ".join(f"{e} Dice | {e} epsilon" for e in engines)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(engines),
    ]
    for name, s in report["sites"].items():
        md.append(
            f"| {name} | {_fmt(s['train_cases'], 'd')} / {_fmt(s['test_cases'], 'd')} | "
            f"{s['noise_multiplier']:.3g} | "
            f"{s['sample_rate']:.3g} | "
            + " | ".join(f"{_fmt(s['dice'][e])} | {_fmt(s['epsilon'][e], '.2f')}" for e in engines)
            + " |"
        )
    md.append(
        "| pooled | | | | "
        + " | ".join(
            f"{_fmt(report['pooled_dice'][e])} | {_fmt(report['max_epsilon'][e], '.2f')} (max)"
            for e in engines
        )
        + " |"
    )
    if any(v is not None for v in report.get("pooled_dice_largest_component", {}).values()):
        md.append(
            "| pooled, largest component kept | | | | "
            + " | ".join(f"{_fmt(report['pooled_dice_largest_component'][e])} | " for e in engines)
            + " |"
        )
    notes = [f"- {e} {n}: {s['status'][e]}" for n, s in report["sites"].items() for e in engines
             if not s["status"][e].startswith("training")]  # fmt: skip
    if notes:
        md += ["", *notes]
    refusals = refusal_lines(report)
    if refusals:
        md += ["", "## Refused by the server", "", *(f"- {line}" for line in refusals)]
    outside = report.get("outside_epsilon")
    if outside is not None:
        md += ["", "## Outside epsilon", ""]
        if outside["figures"]:
            md.append(f"Not covered by the epsilons above ({outside['note']}):")
            md += ["", *(f"- {f}" for f in outside["figures"])]
        else:
            md.append(f"Nothing in this report is outside epsilon: {outside['note']}.")
    if "client_epsilon" in report:
        spent = ", ".join(f"{e} {v:.2f}" for e, v in report["client_epsilon"].items())
        md += ["", f"Client-level (site-level) epsilon at the server: {spent}"]
    if report.get("paired"):
        md += [
            "",
            "## Against non-private training, case by case",
            "",
            "The mean over held-out cases of (engine's Dice - none's Dice) at the last round "
            "both evaluated, with its standard error over cases, and how many cases each won.",
            "",
            "| engine | round | Dice gap | cases won / lost | largest component kept: gap "
            "| won / lost |",
            "|---|---|---|---|---|---|",
        ]
        for e, p in report["paired"].items():
            a, b = p["dice"], p["dice_largest_component"]
            md.append(
                f"| {e} | {p['round']} | {a['gap']:+.3f} +/- {_fmt(a['se'])} "
                f"({a['cases']} cases) | "
                f"{a['ours_better']} / {a['base_better']} | "
                f"{b['gap']:+.3f} +/- {_fmt(b['se'])} | {b['ours_better']} / {b['base_better']} |"
            )
    if "penalty" in report:
        md += [
            "",
            "## Training-time penalty",
            "",
            "Median over rounds of the wall seconds per round (all sites' local training and the "
            "aggregation, one after another in one process; evaluation excluded) and of the "
            "process CPU seconds in that time, and the fastest round (the one least disturbed "
            "when other jobs share the CPU), with ratios to non-private training.",
            "",
            "| engine | seconds / round | time x none | CPU s / round | CPU x none "
            "| fastest round s | fastest x none | final pooled Dice | Dice / none | max epsilon |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e, p in report["penalty"].items():
            md.append(
                f"| {e} | {_fmt(p['seconds_per_round'], '.2f')} | {_fmt(p['time_ratio'], '.2f')} | "
                f"{_fmt(p['cpu_seconds_per_round'], '.2f')} | {_fmt(p['cpu_time_ratio'], '.2f')} | "
                f"{_fmt(p['fastest_round_seconds'], '.2f')} | {_fmt(p['fastest_ratio'], '.2f')} | "
                f"{_fmt(p['final_dice'])} | {_fmt(p['dice_ratio'], '.2f')} | "
                f"{_fmt(p['max_epsilon'], '.2f')} |"
            )
    for e, n in report.get("timing_only", {}).items():
        md += ["", f"{e} ran {n} round(s) for its time per round only; its Dice is not final."]
    head = " | ".join(f"{e} Dice | {e} s" for e in engines)
    md += ["", "## Per round", "", f"| round | {head} |", "|---|" + "---|---|" * len(engines)]
    by = {(r["engine"], r["round"]): r for r in report["rounds"]}
    for k in range(1, max(report["rounds_done"].values()) + 1):
        cells = []
        for e in engines:
            r = by.get((e, k))
            dice, secs = (r.get("pooled_dice"), r["seconds"]) if r else (None, None)
            cells.append(f"{_fmt(dice)} | {_fmt(secs, '.1f')}")
        md.append(f"| {k} | " + " | ".join(cells) + " |")
    if images:
        md += ["", "## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images]
        if "overlays.png" in images:
            md += [
                "",
                "Overlays: held-out cases from the worst to the best Dice, each on the slice "
                "with the most truth voxels: the image, the truth and each engine's prediction "
                "(white: the truth's outline).",
            ]
    (out / "report.md").write_text("\n".join(md) + "\n")


def write_overlays(report: dict, out: Path, k: int = 4) -> str | None:
    """overlays.png: k held-out cases (spread from the worst to the best Dice of the first
    private engine) with the image, the truth and each engine's final global model's
    prediction. Needs the simulator's RUN/checkpoint_<engine>.pt and the data on this
    machine; a Flower server has neither (the sites hold the data): None then."""
    from dpseg.data import MSDDataset
    from dpseg.train.overlay import draw_overlays, pick_cases
    from dpseg.train.scoring import overlay_panels

    cfg = report["config"]
    engines = [e for e in report["engines"] if e not in report.get("timing_only", {})]
    finals = {e: final_cases(report, e) for e in engines}
    engines = [e for e in engines if finals[e] and (out / f"checkpoint_{e}.pt").is_file()]
    root = Path(cfg["data"]) if cfg.get("data") else out / "phantoms"
    if not engines or not (root / "dataset.json").is_file():
        return None
    dataset = MSDDataset(root, check_headers=False)
    known = {c.name for c in dataset.cases}
    lead = next((e for e in engines if e != "none"), engines[0])
    chosen = pick_cases({c: v[0] for c, v in finals[lead].items() if c in known}, k)
    if not chosen:
        return None
    checkpoints = {e: out / f"checkpoint_{e}.pt" for e in engines}
    dice = {e: {c: v[0] for c, v in finals[e].items()} for e in engines}
    panels = overlay_panels(checkpoints, root, chosen, dice, device=cfg.get("device", "cpu"))
    names = {int(c): n for c, n in dataset.labels.items()}
    title = "held-out cases of every site, final global model of each engine"
    return draw_overlays(out / "overlays.png", panels, title=title, label_names=names).name


def write_report(report: dict, out: str | Path, plots: bool = True) -> None:
    out = Path(out)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    images = write_plots(report, out) if plots else []
    overlay = write_overlays(report, out) if plots else None
    write_markdown(report, out, images + ([overlay] if overlay else []))


def _sampling_text(cfg: dict) -> str:
    k = cfg.get("items_per_patient", 1)
    unit = cfg.get("privacy_unit", "patient")
    patches = f", {k} patches a sampled {unit}, averaged before clipping" if k > 1 else ""
    if cfg.get("sample_rate") is not None:
        return (
            f"Poisson over {unit}s at q = {cfg['sample_rate']:g} (declared), normaliser "
            f"--batch {cfg['batch_size']}{patches}, "
        )
    rate = f"Poisson over {unit}s, q = 1 / ceil(n / batch)"
    return f"--batch {cfg['batch_size']} ({rate}){patches}, "


def _accountant_text(cfg: dict) -> str:
    """What each site's epsilon is about (dpseg.privacy.accountants)."""
    unit = cfg.get("privacy_unit", "patient")
    if cfg.get("sample_rate") is not None:
        return f"epsilon per {unit}, add/remove adjacency ({cfg['accountant']} accountant)"
    return (
        f"epsilon per {unit}, replace-one adjacency (q and the normaliser read each site's "
        "size, which is therefore public; dp_accounting's PLD)"
    )
