"""The federated demo (`dpseg demo`, `make demo`): the project's point in a few minutes on
a 2-core CPU.

Three simulated hospitals (scanners) of 400 CT phantoms each (48^3; 390 train, 10 held out)
train one 2-D U-Net (8-16-32) on axial slices, one slice per patient per draw, FedAvg over
12 rounds of 8 local steps at an expected batch of 97.5 patients (q = 1/4, declared with the
normaliser 97, so epsilon is for add/remove adjacency: nothing released reads a site's
size). DP: the patient the unit, sigma solved for epsilon 8 per site at delta 1e-5 over the
96 steps.
dpseg and non-private training run every round; Opacus runs 2 rounds, for its time per
round.

Why these numbers (measured, `dpseg federate`, the same sites and seeds):
- 3-D 16^3 patches of 120 patients a site at batch 24 reached a DP Dice of 0.32 against 0.73
  without DP after 100 steps (ratio 0.45); the noise (sigma C / B per coordinate) swamps the
  gradient at batch 24, and 3-D batches of 120 do not fit 5 minutes on 2 cores. 2-D slices
  cost ~1/5 of a 16^3 patch per sample, so each site can draw 127 patients a step.
- With one learning rate for both (3e-3, Adam), DP plateaued at 0.56 against 0.67 (0.84);
  DP-SGD's noisy gradients want a larger step (the single-site result's 3e-2, too): 0.64
  against 0.67 at 32^3, and at 48^3 0.69 against 0.71 (0.98).
- Time (4 min 13 s in all at first): training 154 s, phantoms 14 s, loading 6 s, and 26
  evaluations of 60 held-out volumes at 3.8 s each; now 10 held-out patients a site, and
  the Opacus rounds are not evaluated.
"""

from __future__ import annotations

from pathlib import Path

DEMO = {
    "phantoms": 1200, "sites": 3, "size": 48, "spatial_dims": 2, "patch": 48,
    "channels": (8, 16, 32), "rounds": 12, "local_steps": 8, "batch_size": 97,
    "sample_rate": 0.25,
    "lr": 3e-3, "dp_lr": 3e-2, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0,
    "test_fraction": 0.025, "engines": ("dpseg", "opacus", "none"),
    "engine_rounds": {"opacus": 2}, "eval_overlap": 0.0,
}  # fmt: skip


def _x(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def story(report: dict, out: str | Path) -> str:
    """The demo's last paragraph, in plain words, from its report.json."""
    cfg = report["config"]
    sites = report["sites"]
    train = sum(s["train_cases"] for s in sites.values())
    test = sum(s["test_cases"] for s in sites.values())
    pooled, eps = report["pooled_dice"], report["max_epsilon"]
    sec = report["seconds_per_round"]
    dims = "2-D slices" if cfg.get("spatial_dims", 3) == 2 else "3-D patches"
    lines = [
        f"What happened: {len(sites)} hospitals trained one segmentation network together on "
        f"{train} patients' CT ({dims}), sharing model updates, never images, for "
        f"{report['rounds_done'].get('dpseg', cfg['rounds'])} rounds.",
    ]
    if pooled.get("dpseg") is not None and pooled.get("none") is not None:
        lines.append(
            f"With differential privacy (each patient's influence clipped and noised; epsilon "
            f"{eps['dpseg']:.2f} per hospital at delta {report['delta']:g}) the liver Dice on "
            f"{test} held-out patients is {pooled['dpseg']:.3f}, against {pooled['none']:.3f} "
            f"without privacy ({pooled['dpseg'] / pooled['none']:.2f}x)."
        )
    timing = f"DP training with dpseg took {sec.get('dpseg', 0):.1f} s a round against "
    timing += f"{sec.get('none', 0):.1f} s without DP ({_x(sec.get('dpseg'), sec.get('none'))})"
    if sec.get("opacus"):
        n = report.get("timing_only", {}).get("opacus")
        rounds = f", timed over {n} rounds" if n else ""
        timing += (
            f"; Opacus, the standard library, took {sec['opacus']:.1f} s "
            f"({_x(sec['opacus'], sec.get('none'))}{rounds})"
        )
    lines.append(timing + ".")
    lines.append(f"The full report is {Path(out) / 'report.md'}; the plots are beside it.")
    return "\n".join(lines)
