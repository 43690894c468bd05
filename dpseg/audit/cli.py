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

_RECORDED = (
    "noise_multiplier", "steps", "sample_rate", "trials", "backend", "path", "delta",
    "confidence", "accountant", "slots", "physical_batch", "seed", "device", "out",
)  # fmt: skip


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
        "--sample-rate", type=float, default=1.0, help="Poisson sample rate q (default 1)"
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
    for key in _RECORDED:
        value = getattr(args, key)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        parts += [f"--{key.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


def run_audit_command(args) -> int:
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
        )  # fmt: skip
        for sigma in args.noise_multiplier
        for backend in args.backend
        for path in args.path
    ]
    for cfg in configs:
        try:
            cfg.check()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
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
