"""SegResNet's spread: subnormal floats (flush them to zero) and huge pages, one process.

    .venv/bin/python docs/results/floor26/spread9/ftz_and_huge_pages.py plain|ftz
    THP_MEM_ALLOC_ENABLE=1 .venv/bin/python docs/results/floor26/spread9/ftz_and_huge_pages.py thp

12 interleaved rounds of 2 steps each (medians), then the process's huge pages and the
subnormal parameters of each engine's model. Output: ftz_and_huge_pages.txt.
"""

from __future__ import annotations

import sys

import torch
from workload import interleaved_medians, warm_steps

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def subnormal_parameters(step) -> int:
    """The subnormal entries of the parameters the step's optimizer updates."""
    cells = [c.cell_contents for c in step.__closure__]
    optimizer = next(c for c in cells if hasattr(c, "param_groups"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return sum(int(((p.abs() > 0) & (p.abs() < SMALLEST_NORMAL)).sum()) for p in params)


def main(mode: str, rounds: int = 12) -> None:
    if mode == "ftz":
        torch.set_flush_denormal(True)
    steps = warm_steps()
    median = {e: round(ms, 1) for e, ms in interleaved_medians(steps, rounds).items()}
    with open("/proc/self/smaps_rollup") as f:
        huge = [line.split()[1] for line in f if line.startswith("AnonHugePages")]
    with torch.no_grad():
        subnormal = {e: subnormal_parameters(step) for e, step in steps.items()}
    ratio = round(median["dpseg"] / median["none"], 3)
    print(mode, "hugeKiB", huge, median, ratio, "subnormal params", subnormal, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
