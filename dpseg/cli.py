"""The ``dpseg`` command. Each subcommand lives in its own function; every one takes
``--config F.toml`` whose keys (dashes or underscores) become that command's defaults, so a
run can be written down once and repeated. User errors exit with code 2 and one paragraph,
never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import tomllib

from dpseg.attack.cli import add_attack_parser
from dpseg.audit.cli import add_audit_parser
from dpseg.cli_types import FREED_MEMORY_POLICIES, UsageError, add_freed_memory_option, csv_list
from dpseg.federated.cli import add_demo_parser, add_federate_parser
from dpseg.nnunet.cli import add_nnunet_parser
from dpseg.train.cli import add_phantoms_parser, add_predict_parser, add_train_parser
from dpseg.train.evaluate_cli import add_evaluate_parser


# --- the user's own network (bench --model, profile --model) -------------------------------
def _add_model_options(p, verb: str) -> None:
    p.add_argument(
        "--model",
        default=None,
        metavar="PACKAGE.MODULE:CALLABLE",
        help=f"{verb} your own network instead of dpseg's U-Net, e.g. "
        "monai.networks.nets:SegResNet",
    )
    p.add_argument(
        "--model-kwargs",
        default="{}",
        metavar="JSON",
        help='keyword arguments for --model, e.g. \'{"spatial_dims": 3, "in_channels": 1, '
        '"out_channels": 2}\' (in_channels and spatial_dims also shape the input)',
    )
    p.add_argument(
        "--spatial-dims", type=int, choices=(2, 3), default=3, help="3-D patches or 2-D slices"
    )


def _user_model(args):
    """(the --model network, its parsed --model-kwargs); UsageError says what to change."""
    from dpseg.perf import load_model
    from dpseg.perf.user_model import parse_model_kwargs

    try:
        kwargs = parse_model_kwargs(args.model_kwargs)
        return load_model(args.model, kwargs), kwargs
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _user_batch(args, model, kwargs: dict, batch: int, size: int):
    """An example batch the --model network accepts: (batch, in_channels, size^spatial_dims)
    with in_channels and spatial_dims from --model-kwargs (else 1 and --spatial-dims)."""
    import torch

    from dpseg.perf import example_batch
    from dpseg.perf.dp_step import first_line

    in_channels = int(kwargs.get("in_channels", 1))
    spatial_dims = int(kwargs.get("spatial_dims", args.spatial_dims))
    torch.manual_seed(0)
    try:
        return example_batch(model, batch, size, in_channels, spatial_dims, args.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(
            f"--model {args.model} did not run on a ({batch}, {in_channels}, "
            f"{size}^{spatial_dims}) input: {first_line(exc)}. Change --size "
            "or --model-kwargs."
        ) from None


# --- bench --------------------------------------------------------------------------------
def _add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="time and peak memory of a DP step beside non-private training and Opacus",
        description=(
            "Runs the same 3D U-Net training step under every engine in one process and prints "
            "median step time and peak memory with ratios to the non-private step. Results are "
            "written to OUT/dp_step_<device>.json and appended to OUT/history.jsonl."
        ),
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    _add_model_options(p, "benchmark")
    p.add_argument(
        "--size", type=int, default=None, help="patch edge (default 64 on cpu, 128 on cuda)"
    )
    p.add_argument(
        "--upsample",
        choices=("transpose", "interp"),
        default="transpose",
        help="the U-Net's upsampling (interp: as the federated runs and the demo)",
    )
    p.add_argument("--batch", type=csv_list(int), default=(2,), help="batch size(s), e.g. 2,4")
    p.add_argument(
        "--channels",
        type=csv_list(int),
        default=None,
        help="U-Net widths (default 16,32,64 cpu; 32,64,128,256 cuda)",
    )
    p.add_argument(
        "--engines",
        type=csv_list(str),
        default=("none", "dpseg", "opacus-hooks", "opacus-functorch"),
        help="comma list of none, dpseg, dpseg-grouped (with --rows-per-patient), "
        "opacus-hooks, opacus-functorch",
    )
    p.add_argument(
        "--rows-per-patient",
        type=int,
        default=1,
        metavar="K",
        help="dpseg-grouped: the batch's rows are patients of K consecutive rows, averaged and "
        "clipped as one (the price of the patient unit, against dpseg on the same rows)",
    )
    p.add_argument(
        "--amp", type=csv_list(str), default=("none",), help="none, bf16, fp16 (comma list)"
    )
    p.add_argument(
        "--physical-batch",
        type=int,
        default=None,
        metavar="P",
        help="virtual steps: each --batch is one logical batch run in physical batches of at "
        "most P (BatchMemoryManager for dpseg and Opacus, gradient accumulation without DP)",
    )
    p.add_argument("--backend", default="auto", help="dpseg fused-op backend")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (engines interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--round-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="run about S seconds of steps per engine in each timed round (the same number "
        "for every engine, paced by the fastest one's warm-up) and record their mean; steadier "
        "ratios for short steps on a shared CPU (default 0: one step a round)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    add_freed_memory_option(p)
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import torch

    from dpseg.perf import StepBenchConfig, run_step_benchmark

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu"
        )
    gpu = args.device == "cuda"
    size = args.size or (128 if gpu else 64)
    if not math.isfinite(args.round_seconds) or args.round_seconds < 0:
        raise UsageError(f"--round-seconds must be a number >= 0, got {args.round_seconds}")
    if args.round_seconds > 0 and args.warmup < 1:
        raise UsageError("--round-seconds paces its rounds by a warm-up step: use --warmup >= 1")
    if args.physical_batch is not None and args.physical_batch < 1:
        raise UsageError(f"--physical-batch must be >= 1, got {args.physical_batch}")
    if args.model is not None:
        return _bench_user_model(args, size)
    channels = args.channels or ((32, 64, 128, 256) if gpu else (16, 32, 64))
    if size % 2 ** (len(channels) - 1):
        raise UsageError(
            f"--size {size} must be divisible by {2 ** (len(channels) - 1)} "
            f"for {len(channels)} U-Net levels"
        )
    reports = []
    for batch in args.batch:
        for amp in args.amp:
            cfg = StepBenchConfig(
                channels=tuple(channels),
                size=size,
                batch=batch,
                device=args.device,
                amp=amp,
                engines=tuple(args.engines),
                repeats=args.repeats,
                warmup=args.warmup,
                backend=args.backend,
                physical_batch=args.physical_batch,
                spatial_dims=args.spatial_dims,
                upsample=args.upsample,
                rows_per_patient=args.rows_per_patient,
                round_seconds=args.round_seconds,
            )
            reports.append(_show(args, run_step_benchmark(cfg, progress=_running)))
    return _write_reports(args, reports)


def _running(engine: str) -> None:
    print(f"  running {engine} ...", file=sys.stderr, flush=True)


def _show(args, report) -> dict:
    """Prints one benchmark's table and appends it to OUT/history.jsonl."""
    from dpseg.perf import format_table
    from dpseg.perf.harness import append_result

    print(format_table(report), flush=True)
    print()
    append_result(args.out / "history.jsonl", report.as_dict())
    return report.as_dict()


def _write_reports(args, reports: list[dict]) -> int:
    latest = args.out / f"dp_step_{args.device}.json"
    latest.write_text(json.dumps(reports, indent=2))
    print(f"wrote {latest} and appended to {args.out / 'history.jsonl'}")
    return 0


def _bench_user_model(args, size: int) -> int:
    from dpseg.perf import bench_step

    model, kwargs = _user_model(args)
    reports = []
    for batch in args.batch:
        x, y = _user_batch(args, model, kwargs, batch, size)
        for amp in args.amp:
            report = bench_step(
                model, x, y, engines=tuple(args.engines), repeats=args.repeats,
                warmup=args.warmup, backend=args.backend, physical_batch=args.physical_batch,
                amp=amp, round_seconds=args.round_seconds, name=args.model, progress=_running,
            )  # fmt: skip
            report.config["model_kwargs"] = kwargs
            reports.append(_show(args, report))
    return _write_reports(args, reports)


# --- profile ------------------------------------------------------------------------------
def _add_profile(sub):
    p = sub.add_parser(
        "profile",
        help="torch.profiler trace of a DP step and a table of where its extra time goes",
        description="Profiles a training step with and without DP (the benchmark U-Net, or your "
        "own network with --model), writes Chrome traces (OUT/trace_none.json, "
        "OUT/trace_dpseg.json) and OUT/profile.json, and prints the DP overhead split by the "
        "engine's ranges (dpseg::backward[Layer], dpseg::per_sample_weight_grad[...], "
        "dpseg::per_sample_norms, dpseg::clip_accumulate_noise, dpseg::optimizer_update).",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    _add_model_options(p, "profile")
    p.add_argument("--size", type=int, default=None, help="patch edge (64 cpu, 128 cuda)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=csv_list(int), default=None, help="U-Net widths")
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 warm-up)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--nvtx", action="store_true", help="also emit NVTX ranges (for nsys)")
    p.add_argument("--out", type=Path, default=Path("runs/profile"))
    add_freed_memory_option(p)
    p.set_defaults(func=_run_profile)


def _run_profile(args) -> int:
    import torch

    from dpseg.perf import StepBenchConfig
    from dpseg.perf.profile import format_profile, profile_dp_step, profile_step

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    if args.batch < 1 or args.steps < 1:
        raise UsageError(f"--batch and --steps must be >= 1, got {args.batch} and {args.steps}")
    gpu = args.device == "cuda"
    size = args.size or (128 if gpu else 64)
    if args.model is not None:
        model, kwargs = _user_model(args)
        x, y = _user_batch(args, model, kwargs, args.batch, size)
        result = profile_step(
            model, x, y, args.out, steps=args.steps, nvtx=args.nvtx, backend=args.backend,
            name=args.model,
        )  # fmt: skip
        result["config"]["model_kwargs"] = kwargs
    else:
        cfg = StepBenchConfig(
            channels=tuple(args.channels or ((32, 64, 128, 256) if gpu else (16, 32, 64))),
            size=size,
            batch=args.batch,
            device=args.device,
            backend=args.backend,
            spatial_dims=args.spatial_dims,
        )
        result = profile_dp_step(cfg, args.out, steps=args.steps, nvtx=args.nvtx)
    (args.out / "profile.json").write_text(json.dumps(result, indent=2))
    print(format_profile(result))
    return 0


# --- entry point --------------------------------------------------------------------------
COMMANDS = [
    add_phantoms_parser, add_train_parser, add_predict_parser, add_evaluate_parser, _add_bench,
    _add_profile,
    add_federate_parser, add_demo_parser, add_attack_parser, add_audit_parser, add_nnunet_parser,
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpseg",
        description="Differentially private training of medical segmentation models.",
    )
    parser.add_argument(
        "--version", action="version", version=f"dpseg {__import__('dpseg').__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.add_argument(
            "--config", type=Path, help="TOML file whose keys set this command's defaults"
        )
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]):
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    try:
        values = tomllib.loads(args.config.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read --config {args.config}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {args.config} is not valid TOML: {exc}") from None
    sub = parser._subparsers._group_actions[0].choices[args.command]
    known = {a.dest for a in sub._actions}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(
            f"--config {args.config}: unknown key(s) {unknown} for 'dpseg {args.command}'"
        )
    for action in sub._actions:  # a TOML value outside an option's choices
        if action.choices is not None and action.dest in values:
            if values[action.dest] not in action.choices:
                raise UsageError(
                    f"--config {args.config}: {action.dest} must be one of "
                    f"{', '.join(map(str, action.choices))}, got {values[action.dest]!r}"
                )
    for action in sub._actions:  # TOML lists for comma-separated options
        if action.dest in values and isinstance(values[action.dest], list):
            values[action.dest] = ",".join(map(str, values[action.dest]))
        if (
            action.dest in values
            and action.type is not None
            and isinstance(values[action.dest], str)
        ):
            values[action.dest] = action.type(values[action.dest])
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def _apply_freed_memory(args) -> None:
    """--freed-memory, for a run whose steps are on the CPU: on a GPU the heap holds little
    of the step, and keeping it would only cost memory."""
    policy = getattr(args, "freed_memory", None)
    if policy is None:
        return
    if policy not in FREED_MEMORY_POLICIES:  # a DPSEG_FREED_MEMORY default skips argparse
        raise UsageError(
            f"--freed-memory (or DPSEG_FREED_MEMORY) must be one of "
            f"{', '.join(FREED_MEMORY_POLICIES)}, got {policy!r}"
        )
    device = getattr(args, "device", None)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cpu"):
        from dpseg.perf.allocator import apply_policy

        apply_policy(policy)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:2] == ["nnunet", "predict"]:  # every argument after is nnUNetv2_predict's
            from dpseg.nnunet.cli import predict_main

            rest = argv[2:]
            return predict_main(rest[1:] if rest[:1] == ["--"] else rest)
        args = _apply_config(parser, argv)
        if args.command is None:
            parser.print_help()
            return 2
        _apply_freed_memory(args)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"dpseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
