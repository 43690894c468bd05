"""Two limits of the DP step on this CPU, measured in one process, interleaved (issue 26).

1. The clip-and-sum pass: ``dpseg.ops.clip_accumulate_noise`` without noise reads B x P
   per-sample gradients and writes P, in GB/s, beside a STREAM-like copy (``dst.copy_(src)``:
   one read and one write per element) and ``add_`` (two reads, one write) on arrays larger
   than the last-level cache, and beside the per-sample norms pass (B x P read). The same
   pass with noise (the DP step's) is reported in ns per parameter.
2. Noise generation in ns per element: dpseg's Philox Gaussian, plain (one normal per
   element) and secure mode (four), beside ``torch.randn`` and ``Tensor.normal_`` on as
   many float32 elements.

Every round runs every workload once, in a rotated order, so load drifting on a shared
machine reaches all of them alike; the report gives the median and the interquartile range
over rounds. Byte counts are what the operation must move (no write-allocate traffic).

    .venv/bin/python bench/limits_cpu.py --threads 2 --rounds 15 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpseg import ops  # noqa: E402
from dpseg.perf.harness import append_result, environment  # noqa: E402


@dataclass
class Workload:
    name: str
    fn: Callable[[], object]
    amount: float  # bytes moved (GB/s) or elements (ns per element)
    unit: str  # "GB/s" or "ns/elem"
    group: str


def workloads(params: int, batches: list[int], stream: int, noise_numel: int) -> list[Workload]:
    g = torch.Generator().manual_seed(0)
    f32 = 4
    src, dst = torch.randn(stream, generator=g), torch.empty(stream)
    a, b = torch.randn(stream, generator=g), torch.randn(stream, generator=g)
    out = [
        Workload("copy_ (STREAM copy)", lambda: dst.copy_(src), 2 * stream * f32, "GB/s", "bw"),
        Workload("add_ (STREAM add)", lambda: a.add_(b), 3 * stream * f32, "GB/s", "bw"),
    ]
    for batch in batches:
        grads = [torch.randn(batch, params, generator=g)]
        c = torch.rand(batch, dtype=torch.float64, generator=g)
        moved = (batch + 1) * params * f32

        def clip(grads=grads, c=c):
            return ops.clip_accumulate_noise(grads, c, 0.0, 0.5, 1, 2, backend="cpp")

        def norms(grads=grads):
            return ops.per_sample_sq_norms(grads, backend="cpp")

        def clip_noise(grads=grads, c=c, draws=1):
            return ops.clip_accumulate_noise(grads, c, 1.0, 0.5, 1, 2, draws, backend="cpp")

        out += [
            Workload(f"clip-and-sum, B={batch}", clip, moved, "GB/s", "bw"),
            Workload(f"per-sample norms, B={batch}", norms, batch * params * f32, "GB/s", "bw"),
            Workload(f"clip + sum + noise, B={batch}", clip_noise, params, "ns/elem", "step"),
        ]
    z = torch.empty(noise_numel)
    out += [
        Workload("torch.randn", lambda: torch.randn(noise_numel), noise_numel, "ns/elem", "noise"),
        Workload("Tensor.normal_", lambda: z.normal_(), noise_numel, "ns/elem", "noise"),
        Workload(
            "dpseg noise (plain)",
            lambda: torch.ops.dpseg.gaussian_noise_(z, 1, 2, 0, 1),
            noise_numel,
            "ns/elem",
            "noise",
        ),
        Workload(
            "dpseg noise (secure, 4 draws)",
            lambda: torch.ops.dpseg.gaussian_noise_(z, 1, 2, 0, 4),
            noise_numel,
            "ns/elem",
            "noise",
        ),
    ]
    return out


def run(loads: list[Workload], rounds: int, warmup: int) -> dict[str, list[float]]:
    for w in loads:
        for _ in range(warmup):
            w.fn()
    times: dict[str, list[float]] = {w.name: [] for w in loads}
    for r in range(rounds):
        k = r % len(loads)
        for w in loads[k:] + loads[:k]:
            start = time.perf_counter()
            w.fn()
            times[w.name].append(time.perf_counter() - start)
    return times


def summarise(loads: list[Workload], times: dict[str, list[float]]) -> list[dict]:
    rows = []
    for w in loads:
        q1, med, q3 = statistics.quantiles(times[w.name], n=4, method="inclusive")
        if w.unit == "GB/s":  # faster time, higher rate: the quartiles swap
            value, lo, hi = (w.amount / t / 1e9 for t in (med, q3, q1))
        else:
            value, lo, hi = (t / w.amount * 1e9 for t in (med, q1, q3))
        rows.append(
            dict(name=w.name, group=w.group, unit=w.unit, median=value, q1=lo, q3=hi,
                 median_ms=med * 1e3, amount=w.amount)
        )  # fmt: skip
    return rows


def format_rows(rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    copy = by["copy_ (STREAM copy)"]["median"]
    randn = by["torch.randn"]["median"]
    normal = by["Tensor.normal_"]["median"]
    lines = [f"{'workload':<34}{'median':>10}{'IQR':>20}  {'unit':<8}vs"]
    for r in rows:
        if r["unit"] == "GB/s":
            vs = f"{r['median'] / copy:.2f} of copy"
        elif r["group"] == "noise":
            vs = f"{r['median'] / randn:.2f} of randn, {r['median'] / normal:.2f} of normal_"
        else:
            vs = ""
        spread = f"{r['q1']:.2f}-{r['q3']:.2f}"
        lines.append(f"{r['name']:<34}{r['median']:>10.2f}{spread:>20}  {r['unit']:<8}{vs}")
    return "\n".join(lines)


def markdown(record: dict, table: str) -> str:
    env, cfg, load = record["environment"], record["config"], record["load_average"]
    argv = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cfg.items() if k != "out")
    return (
        "# CPU limits of the DP step (bench/limits_cpu.py)\n\n"
        f"`.venv/bin/python bench/limits_cpu.py {argv} --out {cfg['out']}`\n\n"
        f"{env['device']}, {env['cpu_count']} CPUs, torch {env['torch']}, commit "
        f"{env['commit']}, {env['date']}; 1-minute load average {load['before'][0]:.2f} before, "
        f"{load['after'][0]:.2f} after.\n\n```\n{table}\n```\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--params", type=int, default=4_700_000, help="P: SegResNet-16 has 4.7 M")
    p.add_argument("--batch", default="2,8", help="B of the clip passes, comma list")
    p.add_argument("--stream", type=int, default=1 << 24, help="STREAM array elements")
    p.add_argument("--noise-numel", type=int, default=4_700_000)
    p.add_argument("--out", type=Path, default=None, help="write limits_cpu.json here")
    args = p.parse_args(argv)
    if "cpp" not in ops.BACKENDS:
        sys.exit("the dpseg C++ extension is not built: python setup.py build_ext --inplace")
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    loads = workloads(args.params, batches, args.stream, args.noise_numel)
    load_before = os.getloadavg()
    times = run(loads, args.rounds, args.warmup)
    load_after = os.getloadavg()
    rows = summarise(loads, times)
    print(
        f"{args.threads} threads, {args.rounds} rounds; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs"
    )
    table = format_rows(rows)
    print(table)
    if args.out is not None:
        record = {
            "benchmark": "limits_cpu",
            "config": {**vars(args), "out": str(args.out)},
            "load_average": {"before": load_before, "after": load_after},
            "environment": environment("cpu"),
            "results": rows,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "limits_cpu.json").write_text(json.dumps(record, indent=2))
        (args.out / "limits_cpu.md").write_text(markdown(record, table))
        append_result(args.out / "limits_history.jsonl", record)
        print(f"wrote {args.out / 'limits_cpu.json'} and .md, appended to limits_history.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
