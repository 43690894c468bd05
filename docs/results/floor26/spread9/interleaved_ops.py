"""SegResNet's DP and non-private steps profiled interleaved, op by op, in one process.

ops_by_process.py profiles each engine in its own window, so the machine's drift between
windows (oneDNN's convolutions moved by 30% from one window to the next) drowns the
difference sought. Here the profiler runs across interleaved rounds (none, dpseg, none,
...), each step inside a range that names its engine, and every op's self time is charged
to the engine whose step holds it.

    .venv/bin/python docs/results/floor26/spread9/interleaved_ops.py OUT.json
"""

from __future__ import annotations

import bisect
import collections
import json
import statistics
import sys
import time

from torch.profiler import ProfilerActivity, profile, record_function
from workload import warm_steps


def main(out: str, rounds: int = 12) -> None:
    steps = warm_steps()
    wall = {e: [] for e in steps}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            for e, step in steps.items():
                t0 = time.perf_counter()
                with record_function(f"step:{e}"):
                    step()
                wall[e].append(time.perf_counter() - t0)
    events = [ev for ev in prof.events() if ev.device_type.name == "CPU"]
    spans = sorted(
        (ev.time_range.start, ev.time_range.end, ev.name.split(":")[1])
        for ev in events
        if ev.name.startswith("step:")
    )
    starts = [s[0] for s in spans]
    self_us = {e: collections.Counter() for e in steps}
    for ev in events:
        if ev.name.startswith("step:"):
            continue
        i = bisect.bisect_right(starts, ev.time_range.start) - 1
        if i >= 0 and ev.time_range.end <= spans[i][1]:
            self_us[spans[i][2]][ev.name] += ev.self_cpu_time_total
    result = {
        "median_ms": {e: 1e3 * statistics.median(w) for e, w in wall.items()},
        "self_ms": {
            e: {k: v / 1e3 / rounds for k, v in c.most_common()} for e, c in self_us.items()
        },
    }
    result["ratio"] = result["median_ms"]["dpseg"] / result["median_ms"]["none"]
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(out, {k: round(v, 1) for k, v in result["median_ms"].items()}, round(result["ratio"], 3))


if __name__ == "__main__":
    main(sys.argv[1])
