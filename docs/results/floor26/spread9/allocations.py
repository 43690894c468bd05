"""What each engine's SegResNet step allocates: bytes and counts, by size, per step.

A DP step that is more sensitive to 4 KiB pages than the plain one (README.md) may simply
ask the allocator for more, or larger, fresh buffers. The profiler's memory events give
every allocation of two steps of each engine (after warm-up).

    .venv/bin/python docs/results/floor26/spread9/allocations.py
"""

from __future__ import annotations

import json
import tempfile

from torch.profiler import ProfilerActivity, profile
from workload import warm_steps

MiB = 2**20


def main(steps: int = 2) -> None:
    for engine, step in warm_steps().items():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(steps):
                step()
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            with open(f"{tmp}/trace.json") as f:
                trace = json.load(f)["traceEvents"]
        sizes = [
            e["args"]["Bytes"]
            for e in trace
            if e.get("name") == "[memory]" and e.get("args", {}).get("Bytes", 0) > 0
        ]
        big = [s for s in sizes if s >= 2 * MiB]
        print(
            f"{engine:6s} a step: {len(sizes) / steps:7.0f} allocations, "
            f"{sum(sizes) / steps / MiB:8.1f} MiB; of 2 MiB or more: {len(big) / steps:5.0f}, "
            f"{sum(big) / steps / MiB:8.1f} MiB"
        )


if __name__ == "__main__":
    main()
