"""`dpseg audit`: measure the epsilon dpseg's DP step leaks, beside the epsilon it claims.

Exit code 1 when any audit measures more than its claim (the engine leaks), 2 for a usage
error, 0 otherwise.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from dpseg.cli_types import UsageError, csv_list

__all__ = ["add_audit_parser", "run_audit_command"]

_RECORDED = {
    "slots": (
        "noise_multiplier", "steps", "sample_rate", "trials", "backend", "path", "delta",
        "confidence", "accountant", "slots", "physical_batch", "rows_per_canary",
        "canary_layout", "collate", "structure", "tokens", "seed", "device", "out",
    ),
    "add-remove": (
        "worlds", "noise_multiplier", "sample_rate", "patients", "batch_size",
        "expected_batch_size", "epochs", "dims", "rows_per_canary", "runs", "opacus_convention",
        "delta", "confidence", "accountant", "seed", "out",
    ),
}  # fmt: skip


def add_audit_parser(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="empirical privacy audit: the epsilon the DP step leaks against what it claims",
        description=(
            "Runs dpseg's real DP step many times on a model of many independent one-weight "
            "slots, half of them with a Dirac canary (a per-sample gradient of 4C in that "
            "slot's coordinate, so clipping must act), scores every slot of every released "
            "update with the likelihood-ratio statistic of the claimed mechanism, and turns "
            "the false positive and negative rates into a lower bound on epsilon "
            "(Clopper-Pearson, threshold picked on a held-out quarter). Each audit is compared "
            "with the engine's own accountant for the same noise, sample rate and steps. "
            "Writes OUT/report.json, report.md and epsilon.png. Exits 1 if any lower bound "
            "exceeds its claim."
        ),
        epilog=(
            "example: dpseg audit --noise-multiplier 0,1,2 --trials 1000000 --out runs/audit; "
            "multi-step: dpseg audit --noise-multiplier 1 --steps 10 --sample-rate 0.1 "
            "--trials 200000 --out runs/audit_q"
        ),
    )
    p.add_argument(
        "--noise-multiplier",
        type=csv_list(float),
        default=(0.0, 1.0, 2.0),
        help="sigma values to audit, comma list (default 0,1,2)",
    )
    p.add_argument("--steps", type=int, default=1, help="DP steps per run, T (default 1)")
    p.add_argument(
        "--sample-rate",
        type=float,
        default=None,
        help="Poisson sample rate q (default 1 for slots, 0.1 for add-remove worlds)",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=1_000_000,
        help="trials per world (default 1,000,000: about 20 s per sigma on 2 CPU cores)",
    )
    p.add_argument(
        "--backend",
        type=csv_list(str),
        default=("auto",),
        help="fused-op backends to audit, comma list: auto, torch, cpp, triton, cuda",
    )
    p.add_argument(
        "--path",
        type=csv_list(str),
        default=("plain",),
        help="plain (one batch a step), batch_memory_manager (physical batches) and/or ddp (two "
        "gloo processes, the model in DistributedDataParallel)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (created)")
    p.add_argument(
        "--worlds",
        choices=("slots", "add-remove"),
        default="slots",
        help="slots (default): many canary slots in every run, the DP step itself. "
        "add-remove: one world a run, a canary patient present (N + 1 patients) or absent "
        "(N), through the user's DataLoader, the Poisson loader, the collate, the "
        "normaliser and the steps a pass; scored on the raw released updates (the canary "
        "coordinate, and their energy, which sees their scale and count)",
    )
    units = p.add_argument_group("the unit (patient canaries)")
    units.add_argument(
        "--rows-per-canary",
        type=int,
        default=1,
        help="k rows of one canary patient, averaged and clipped as one (default 1)",
    )
    units.add_argument(
        "--canary-layout",
        choices=("multi-sample", "patients"),
        default="multi-sample",
        help="how the k rows reach the step: one item holding a list of k samples "
        "(MONAI's multi-sample transforms), or k items of a declared patient",
    )
    units.add_argument(
        "--collate",
        choices=("dpseg", "monai"),
        default="dpseg",
        help="the multi-sample layout's collate: dpseg.data.flatten_collate or MONAI's "
        "list_data_collate (needs monai)",
    )
    units.add_argument(
        "--structure",
        choices=("flat", "tokens", "windows"),
        default="flat",
        help="how a sample reaches the layer: one row, --tokens tokens of one row ((B, T, D), "
        "a transformer's Linear), or windows of two tokens each a row ((B x windows, 2, D), "
        "Swin's window attention), summed back per sample",
    )
    units.add_argument("--tokens", type=int, default=4, help="tokens a sample (default 4)")
    worlds = p.add_argument_group("add-remove worlds")
    worlds.add_argument("--patients", type=int, default=100, help="N, world 0 (default 100)")
    worlds.add_argument(
        "--batch-size", type=int, default=10, help="the user's DataLoader batch (default 10)"
    )
    worlds.add_argument(
        "--expected-batch-size",
        type=float,
        default=10.0,
        help="the declared normaliser (default 10); --sample-rate is the declared q "
        "(default 0.1 for these worlds)",
    )
    worlds.add_argument("--epochs", type=int, default=1, help="passes over the loader")
    worlds.add_argument("--dims", type=int, default=2000, help="model parameters (default 2000)")
    worlds.add_argument("--runs", type=int, default=400, help="runs per world (default 400)")
    worlds.add_argument(
        "--opacus-convention",
        action="store_true",
        help="derive q, the steps and the normaliser from N as Opacus does (N is then "
        "public: the claim is for replace-one and is not audited by these worlds)",
    )
    extra = p.add_argument_group("details")
    extra.add_argument("--delta", type=float, default=1e-5)
    extra.add_argument("--confidence", type=float, default=0.95)
    extra.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    extra.add_argument(
        "--slots", type=int, default=4000, help="slots per run (trials per run: half a world)"
    )
    extra.add_argument(
        "--physical-batch",
        type=int,
        default=None,
        help="batch_memory_manager path: physical batch (default a quarter of the expected "
        "logical batch)",
    )
    extra.add_argument("--seed", type=int, default=0)
    extra.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.set_defaults(func=run_audit_command)


def _command(args) -> str:
    parts = ["dpseg", "audit"]
    for key in _RECORDED[args.worlds]:
        value = getattr(args, key)
        if value is None or value is False:
            continue
        if value is True:
            parts.append(f"--{key.replace('_', '-')}")
            continue
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


def _check_all(configs) -> None:
    for cfg in configs:
        try:
            cfg.check()
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def _run_worlds(args) -> int:
    import json

    from tqdm import tqdm

    from dpseg.audit.worlds import WorldsConfig, run_worlds_audit, verdict, worlds_markdown
    from dpseg.perf import environment

    if (args.out / "report.json").exists():
        raise UsageError(f"{args.out} already holds an audit; choose a new --out")
    declared = not args.opacus_convention
    configs = [
        WorldsConfig(
            noise_multiplier=sigma,
            patients=args.patients,
            batch_size=args.batch_size,
            sample_rate=(0.1 if args.sample_rate is None else args.sample_rate)
            if declared
            else None,
            expected_batch_size=args.expected_batch_size if declared else None,
            epochs=args.epochs,
            dims=args.dims,
            rows_per_canary=args.rows_per_canary,
            runs=args.runs,
            delta=args.delta,
            confidence=args.confidence,
            accountant=args.accountant,
            backend=args.backend[0],
            seed=args.seed,
        )  # fmt: skip
        for sigma in args.noise_multiplier
    ]
    _check_all(configs)
    results = []
    for cfg in configs:
        label = f"add/remove worlds, sigma {cfg.noise_multiplier:g}"
        with tqdm(total=2 * cfg.runs, desc=label, unit="run", disable=None, leave=False) as bar:
            r = run_worlds_audit(cfg, progress=lambda done, total: bar.update(1))
        claimed = "inf" if r.epsilon_claimed is None else f"{r.epsilon_claimed:.2f}"
        print(
            f"{label}: epsilon lower {r.epsilon_lower:.2f} (95%, {r.best_score}), claimed "
            f"{claimed} ({r.adjacency}), {r.runs} runs a world, steps {r.steps}, "
            f"{r.seconds:.0f} s: {verdict(r)}",
            flush=True,
        )
        results.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": _command(args),
        "environment": environment(args.device),
        "worlds": [{**r.as_dict(), "verdict": verdict(r)} for r in results],
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(worlds_markdown(results, report["command"]))
    print(f"wrote {args.out / 'report.json'} and report.md")
    leaks = [r for r in results if verdict(r).startswith("LEAKS")]
    return 1 if leaks else 0


def run_audit_command(args) -> int:
    if args.worlds == "add-remove":
        return _run_worlds(args)
    if args.sample_rate is None:
        args.sample_rate = 1.0
    import torch
    from tqdm import tqdm

    from dpseg import ops
    from dpseg.audit.auditor import PATHS, AuditConfig, run_audit
    from dpseg.audit.report import verdict, write_report
    from dpseg.perf import environment

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    for backend in args.backend:
        if backend != "auto" and backend not in ops.available_backends():
            raise UsageError(
                f"--backend {backend} is not available here (available: "
                f"{', '.join(ops.available_backends())}; triton on CPU needs TRITON_INTERPRET=1)"
            )
    for path in args.path:
        if path not in PATHS:
            raise UsageError(f"--path {path}: use one of {', '.join(PATHS)}")
    if (args.out / "report.json").exists():
        raise UsageError(f"{args.out} already holds an audit; choose a new --out")
    configs = [
        AuditConfig(
            noise_multiplier=sigma,
            steps=args.steps,
            sample_rate=args.sample_rate,
            trials=args.trials,
            delta=args.delta,
            confidence=args.confidence,
            backend=backend,
            path=path,
            physical_batch=args.physical_batch,
            slots=args.slots,
            accountant=args.accountant,
            seed=args.seed,
            device=args.device,
            rows_per_canary=args.rows_per_canary,
            canary_layout=args.canary_layout,
            collate=args.collate,
            structure=args.structure,
            tokens=args.tokens,
        )  # fmt: skip
        for sigma in args.noise_multiplier
        for backend in args.backend
        for path in args.path
    ]
    _check_all(configs)
    results = []
    for cfg in configs:
        label = f"sigma {cfg.noise_multiplier:g}, {cfg.backend}, {cfg.path}"
        with tqdm(total=cfg.runs, desc=label, unit="run", disable=None, leave=False) as bar:
            result = run_audit(cfg, progress=lambda done, total: bar.update(1))
        claimed = "inf" if result.epsilon_claimed is None else f"{result.epsilon_claimed:.2f}"
        print(
            f"{label}: epsilon lower {result.epsilon_lower:.2f} (95%), claimed {claimed}, "
            f"{result.trials:,} trials a world, {result.seconds:.0f} s: {verdict(result)}",
            flush=True,
        )
        results.append(result)
    write_report(args.out, results, _command(args), environment(args.device))
    print(f"wrote {args.out / 'report.json'}, report.md and epsilon.png")
    leaks = [r for r in results if r.epsilon_claimed is not None and verdict(r) != "ok"]
    if leaks:
        print(
            f"dpseg audit: {len(leaks)} audit(s) measured more epsilon than the accountant "
            "claims: the DP step does not give the guarantee it reports",
            file=sys.stderr,
        )
        return 1
    return 0
