"""What each engine's SegResNet step allocates: bytes and counts, by size, per step.

A DP step that is more sensitive to 4 KiB pages than the plain one (README.md) may simply
ask the allocator for more, or larger, fresh buffers. The profiler's memory events give
every allocation of two steps of each engine (after warm-up).

    .venv/bin/python docs/results/floor26/spread9/allocations.py
"""

from __future__ import annotations

import json
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from dpseg.perf.dp_step import StepBenchConfig, make_step
from dpseg.perf.user_model import example_batch, load_model

KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16}
MiB = 2**20


def main(steps: int = 2) -> None:
    torch.manual_seed(0)
    model = load_model("monai.networks.nets:SegResNet", KWARGS)
    x, y = example_batch(model, batch=2, size=48)
    cfg = StepBenchConfig(batch=2, size=48)
    for engine in ("none", "dpseg"):
        step = make_step(engine, model, x, y, cfg)
        for _ in range(3):
            step()
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
