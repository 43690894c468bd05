"""Where SegResNet's DP step spends its time, process by process.

SegResNet's dpseg step took 651 ms in one process and 717-734 ms in two others (idle8), with
the non-private step the same in all three. This script times both steps over interleaved
rounds as `dpseg bench` does, then profiles a few steps of each and writes every op's self
CPU time, so that a slow process and a fast one can be compared op by op.

    .venv/bin/python docs/results/floor26/spread9/ops_by_process.py OUT.json
"""

from __future__ import annotations

import json
import sys

from torch.profiler import ProfilerActivity, profile
from workload import interleaved_medians, warm_steps


def main(out: str, rounds: int = 15, profiled: int = 4) -> None:
    steps = warm_steps()
    result = {"median_ms": interleaved_medians(steps, rounds)}
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
