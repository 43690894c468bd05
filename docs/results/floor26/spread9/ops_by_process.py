"""Where SegResNet's DP step spends its time, process by process.

SegResNet's dpseg step took 651 ms in one process and 717-734 ms in two others (idle8), with
the non-private step the same in all three. This script times both steps over interleaved
rounds as `dpseg bench` does, then profiles a few steps of each and writes every op's self
CPU time, so that a slow process and a fast one can be compared op by op.

    .venv/bin/python docs/results/floor26/spread9/ops_by_process.py OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dpseg.perf.dp_step import StepBenchConfig, make_step
from dpseg.perf.user_model import example_batch, load_model

KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16}


def main(out: str, rounds: int = 15, profiled: int = 4) -> None:
    torch.manual_seed(0)
    model = load_model("monai.networks.nets:SegResNet", KWARGS)
    x, y = example_batch(model, batch=2, size=48)
    cfg = StepBenchConfig(batch=2, size=48)
    steps = {e: make_step(e, model, x, y, cfg) for e in ("none", "dpseg")}
    for step in steps.values():
        for _ in range(3):
            step()
    times = {e: [] for e in steps}
    for _ in range(rounds):
        for e, step in steps.items():
            t0 = time.perf_counter()
            step()
            step()
            times[e].append((time.perf_counter() - t0) / 2)
    result = {"median_ms": {e: 1e3 * statistics.median(t) for e, t in times.items()}}
    result["ratio"] = result["median_ms"]["dpseg"] / result["median_ms"]["none"]
    for e, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(profiled):
                step()
        result[e] = {
            a.key: {"self_ms": a.self_cpu_time_total / 1e3 / profiled, "count": a.count / profiled}
            for a in prof.key_averages()
        }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(out, {k: round(v, 1) for k, v in result["median_ms"].items()}, round(result["ratio"], 3))


if __name__ == "__main__":
    main(sys.argv[1])
