"""`dpseg attack`: invert what a site shares, under each defence, beside a random baseline.

User errors (unknown case, bad defence spec, patch that does not fit, non-MSD folder)
become ``UsageError``: one paragraph, exit code 2, no traceback.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from dpseg.cli_types import UsageError, csv_list

__all__ = ["add_attack_parser", "run_attack"]


def add_attack_parser(sub) -> None:
    p = sub.add_parser(
        "attack",
        help="gradient inversion of a site's shared update, undefended and under clipping/DP",
        description=(
            "Takes B slices (--dims 2) or patches (--dims 3) of one real case, computes the "
            "update a site would share for them with each defence (none: the plain gradient; "
            "clip[:C]: per-sample clipping to C, default 1; dp:SIGMA[:C]: clipping plus "
            "Gaussian noise of std SIGMA*C, via dpseg's engine), reconstructs the input from "
            "each by gradient matching (cosine distance, TV prior, signed Adam, box = the CT "
            "window, restarts) and scores it against the original (SSIM, PSNR, MSE) beside the "
            "same attack fed a random gradient. Writes OUT/report.json, report.md, attack.png, "
            "reconstructions.npz (the original and every reconstruction) and, with 'none' "
            "among the defences and a known mask, path.png (the gradient distance on the "
            "line from the original to the undefended reconstruction)."
        ),
        epilog=(
            "example: dpseg attack --data ../shared/data/liver_ct_mini --case liver_0 --dims 2 "
            "--patch 64 --batch 1 --iterations 300 --restarts 2 "
            "--defences none,clip,dp:0.1,dp:0.5,dp:1.0 --out runs/attack2d"
        ),
    )
    p.add_argument(
        "--data", type=Path, required=True, help="MSD folder (dataset.json, imagesTr/, labelsTr/)"
    )
    p.add_argument(
        "--case",
        required=True,
        help="case name, e.g. liver_0 (the image file name without .nii.gz)",
    )
    p.add_argument(
        "--dims", type=int, choices=(2, 3), default=2, help="2: axial slices; 3: cubic patches"
    )
    p.add_argument("--patch", type=int, default=64, help="slice/patch edge in voxels (default 64)")
    p.add_argument("--batch", type=int, default=1, help="items in the attacked batch (default 1)")
    p.add_argument("--iterations", type=int, default=300, help="Adam iterations per restart")
    p.add_argument(
        "--restarts", type=int, default=2, help="random restarts; the best update match is kept"
    )
    p.add_argument(
        "--defences",
        default="none,clip,dp:0.1,dp:0.5,dp:1.0",
        help="comma list of none, clip[:C], dp:SIGMA[:C] (C = max_grad_norm, default 1)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder to create or overwrite")
    extra = p.add_argument_group("model and attack details (beyond the issue's required flags)")
    extra.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="Adam steps on the other cases before the attack (0 = model at init)",
    )
    extra.add_argument(
        "--channels",
        type=csv_list(int),
        default=(8, 16, 32),
        help="U-Net widths per level (default 8,16,32)",
    )
    extra.add_argument(
        "--mask",
        choices=("known", "joint"),
        default="known",
        help="attacker knows the mask, or optimises it jointly",
    )
    extra.add_argument(
        "--local-steps",
        type=int,
        default=0,
        help="0: the site shares a gradient; k: its weights after k local SGD steps",
    )
    extra.add_argument(
        "--local-lr", type=float, default=0.01, help="learning rate of those local steps"
    )
    extra.add_argument(
        "--lr", type=float, default=0.03, help="attack step size (signed Adam, image in [0, 1])"
    )
    extra.add_argument("--tv", type=float, default=0.1, help="total-variation weight")
    extra.add_argument("--seed", type=int, default=0, help="model init, noise and restart seed")
    extra.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine 2 threads ran the "
        "attack's double backward 10-20x slower than 1)",
    )
    p.set_defaults(func=run_attack)


def _check(args) -> None:

    for name in ("patch", "batch", "iterations", "restarts", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("train_steps", "local_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if not args.channels or min(args.channels) < 1:
        raise UsageError(f"--channels needs positive widths, e.g. 8,16,32; got {args.channels}")
    divisor = 2 ** (len(args.channels) - 1)
    if args.patch % divisor:
        raise UsageError(
            f"--patch {args.patch} must be divisible by {divisor} for a {len(args.channels)}-level "
            "U-Net (--channels); e.g. 32 or 64"
        )
    if args.patch < 11:
        raise UsageError(f"--patch {args.patch} is below SSIM's 11-voxel window; use >= 16")


def run_attack(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from dpseg.data import DataError, MSDDataset

    from .defences import parse_defences
    from .experiment import ExperimentConfig, run_experiment
    from .inversion import InversionConfig
    from .report import markdown_table, save_figure, save_path_figure, write_report

    _check(args)
    try:
        defences = parse_defences(args.defences)
    except ValueError as exc:
        raise UsageError(f"--defences: {exc}") from None
    try:
        cases = [c.name for c in MSDDataset(args.data).cases]
    except DataError as exc:
        raise UsageError(" ".join(str(exc).split())) from None
    if args.case not in cases:
        raise UsageError(f"--case {args.case!r} is not in {args.data} (cases: {', '.join(cases)})")
    cfg = ExperimentConfig(
        data=args.data,
        case=args.case,
        dims=args.dims,
        patch=args.patch,
        batch=args.batch,
        defences=defences,
        channels=tuple(args.channels),
        train_steps=args.train_steps,
        local_steps=args.local_steps,
        local_lr=args.local_lr,
        seed=args.seed,
        inversion=InversionConfig(
            iterations=args.iterations,
            restarts=args.restarts,
            lr=args.lr,
            tv_weight=args.tv,
            mask=args.mask,
            seed=args.seed,
        ),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    total = (len(defences) + 1) * args.restarts * args.iterations
    bar = tqdm(total=total, desc="attack", unit="it", file=sys.stderr, dynamic_ncols=True)

    def progress(name: str, n: int) -> None:
        if bar.postfix != name:
            bar.set_postfix_str(name, refresh=False)
        bar.update(n)

    try:
        report, recs, original = run_experiment(cfg, progress)
    except (DataError, ValueError) as exc:
        raise UsageError(" ".join(str(exc).split())) from None
    finally:
        bar.close()
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    scores = {r["name"]: r["ssim"] for r in report["defences"]}
    scores[report["baseline"]["name"]] = report["baseline"]["ssim"]
    state = "init" if args.train_steps == 0 else f"{args.train_steps} training steps"
    save_figure(
        args.out / "attack.png",
        original,
        recs,
        scores,
        f"{args.case} {args.dims}D patch {args.patch}, batch {args.batch}, model at {state}",
    )
    report["figure"] = "attack.png"
    # The images themselves, for any later analysis: the original and each reconstruction.
    np.savez_compressed(
        args.out / "reconstructions.npz",
        original=original.numpy(),
        **{name: rec.numpy() for name, rec in recs.items()},
    )
    report["reconstructions"] = "reconstructions.npz"
    if save_path_figure(args.out / "path.png", report) is not None:
        report["path_figure"] = "path.png"
    command = _reconstruct_command(args)
    report["command"] = command
    write_report(args.out, report, command)
    print(markdown_table(report))
    written = ["report.md", "attack.png", report.get("path_figure"), "reconstructions.npz"]
    print(f"wrote {args.out / 'report.json'}, " + ", ".join(n for n in written if n))
    return 0


def _reconstruct_command(args) -> str:
    """The equivalent command line (argparse keeps no copy of argv)."""
    parts = ["dpseg", "attack"]
    for key in (
        "data",
        "case",
        "dims",
        "patch",
        "batch",
        "iterations",
        "restarts",
        "defences",
        "out",
        "train_steps",
        "channels",
        "mask",
        "local_steps",
        "local_lr",
        "lr",
        "tv",
        "seed",
    ):
        value = getattr(args, key)
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)
