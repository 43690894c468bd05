"""`dpseg evaluate`: the argparse front end of dpseg.train.scoring."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from dpseg.cli_types import UsageError

__all__ = ["add_evaluate_parser"]


def _named_checkpoint(text: str) -> tuple[str | None, Path]:
    name, sep, path = text.partition("=")
    if sep and name and path:
        return name, Path(path)
    return None, Path(text)


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a trained checkpoint on the labelled cases of an MSD folder (Dice per "
        "label, epsilon), or compare two scorings case by case",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Scores a `dpseg train` (or `dpseg federate`) checkpoint on every labelled case "
            "of an MSD folder (or the cases of a split list) with the run's own preprocessing "
            "and sliding window: Dice per label and its mean, as predicted and with each "
            "label's largest connected component kept, per case and over cases, with epsilon, "
            "delta, unit and adjacency from the checkpoint's privacy ledger (null without DP). "
            "Writes F.json, F.md and F_overlays.png (a few cases from the worst to the best "
            "Dice: image, truth, each model's prediction) and prints a table.\n\n"
            "  dpseg evaluate --checkpoint RUN/checkpoint.pt --data MSD --out F.json \\\n"
            "      --cases docs/results/hippocampus/split.json:test \\\n"
            "      [--also non-private=RUN2/checkpoint.pt]\n"
            "  dpseg evaluate --compare A.json B.json [--out AB.json]\n\n"
            "--compare gives, for two scorings of the same cases, the mean per-case difference "
            "A - B and its 95% paired bootstrap interval (cases resampled with replacement)."
        ),
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="RUN/checkpoint.pt of `dpseg train`, or RUN/checkpoint_<engine>.pt of `dpseg "
        "federate` (its global model; epsilon: the largest over sites)",
    )
    p.add_argument("--data", type=Path, help="MSD folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument(
        "--out", type=Path, help="F.json to write (F.md and F_overlays.png go beside it)"
    )
    p.add_argument(
        "--cases",
        default=None,
        metavar="FILE[:KEY]",
        help="score only list KEY (default 'test') of a split file, e.g. "
        "docs/results/hippocampus/split.json:test (default: every labelled case)",
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="[NAME=]CKPT",
        help="another checkpoint whose predictions join the overlay panels (repeatable), "
        "e.g. --also non-private=runs/nodp/checkpoint.pt; F.json scores --checkpoint only",
    )
    p.add_argument(
        "--name", default=None, help="the model's name in the panels (default: non-private "
        "or 'DP eps E')"
    )  # fmt: skip
    p.add_argument("--overlay-cases", type=int, default=4, help="rows of overlay panels (0: none)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (run's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A.json", "B.json"),
        help="paired per-case bootstrap of two F.json files over the same cases",
    )
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples (--compare)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (--compare)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from dpseg.data import DataError

    try:
        if args.compare:
            return _compare(args)
        return _evaluate(args)
    except (DataError, ValueError) as exc:
        raise UsageError(" ".join(str(exc).split())) from None


def _compare(args) -> int:
    from dpseg.train.scoring import compare_scores, format_comparison, read_scores

    given = [f"--{k}" for k in ("checkpoint", "data", "cases") if getattr(args, k) is not None]
    if given or args.also:
        raise UsageError(
            f"--compare reads two F.json files; drop {', '.join(given) or '--also'} (score each "
            "checkpoint first with --checkpoint ... --out F.json)"
        )
    if args.n_boot < 100:
        raise UsageError(f"--n-boot must be >= 100 for a 95% interval, got {args.n_boot}")
    if args.out is not None and args.out.suffix != ".json":
        raise UsageError(f"--out {args.out}: give a .json file name for the comparison")
    a, b = (read_scores(path) for path in args.compare)
    rows = compare_scores(a, b, n_boot=args.n_boot, seed=args.seed)
    print(format_comparison(rows, f"{args.compare[0]} ({a.get('model')})",
                            f"{args.compare[1]} ({b.get('model')})"))  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = {"a": str(args.compare[0]), "b": str(args.compare[1]), "rows": rows}
        args.out.write_text(json.dumps(body, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _evaluate(args) -> int:
    import torch

    from dpseg.train.overlay import draw_overlays, pick_cases
    from dpseg.train.saved_model import load_saved_model
    from dpseg.train.scoring import (
        evaluate_checkpoint,
        format_markdown,
        format_table,
        overlay_panels,
    )

    missing = [f"--{k}" for k in ("checkpoint", "data", "out") if getattr(args, k) is None]
    if missing:
        raise UsageError(
            f"{', '.join(missing)} required: dpseg evaluate --checkpoint RUN/checkpoint.pt "
            "--data MSD_FOLDER --out F.json (or --compare A.json B.json)"
        )
    if args.out.suffix != ".json":
        raise UsageError(f"--out {args.out}: give a .json file name, e.g. test.json")
    if args.overlay_cases < 0:
        raise UsageError(f"--overlay-cases must be >= 0, got {args.overlay_cases}")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UsageError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device; use cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    others = [_named_checkpoint(t) for t in args.also]
    for _, path in others:
        if not path.is_file():
            raise UsageError(f"--also {path}: checkpoint not found")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot create its folder ({exc.strerror})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # seen_in_training: in the table below
        result = evaluate_checkpoint(
            args.checkpoint, args.data, args.cases, device=args.device, overlap=args.overlap,
            progress=not args.quiet,
        )  # fmt: skip
    overlay = None
    if args.overlay_cases:
        name = args.name or result["model"]
        checkpoints = {name: load_saved_model(args.checkpoint, args.device)}
        for other, path in others:
            saved = load_saved_model(path, args.device)
            other = other or saved.label
            if other in checkpoints:
                other = f"{other} ({path.parent.name})"
            checkpoints[other] = saved
        cases = pick_cases(
            {c: r["mean_dice"] for c, r in result["per_case"].items()}, args.overlay_cases
        )
        dice = {name: {c: r["mean_dice"] for c, r in result["per_case"].items()}}
        panels = overlay_panels(checkpoints, args.data, cases, dice, device=args.device)
        png = args.out.with_name(f"{args.out.stem}_overlays.png")
        draw_overlays(
            png, panels, title=f"{Path(args.data).name}: {result['case_source']}",
            label_names={int(c): n for c, n in result["label_names"].items()},
        )  # fmt: skip
        overlay = png.name
        result["overlays"] = overlay
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(format_markdown(result, overlay))
    print(format_table(result))
    print(f"wrote {args.out}, {md.name}" + (f" and {overlay}" if overlay else ""))
    return 0
