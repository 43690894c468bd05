"""Page faults, system time and step time of SegResNet's two steps (48^3, batch 2), engines
interleaved in one process, under one policy for freed memory (dpseg.perf.allocator):

    .venv/bin/python docs/results/floor26/malloc10/faults_by_policy.py return|keep|keep-all [ROUNDS]

A round runs each engine's step twice; the figures are per step.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spread9"))

from workload import warm_steps  # noqa: E402

from dpseg.perf.allocator import apply_policy, freed_memory_policy  # noqa: E402


def main(policy: str, rounds: int = 12) -> None:
    apply_policy(policy)
    steps = warm_steps()
    rows = {e: [] for e in steps}
    for _ in range(rounds):
        for engine, step in steps.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            for _ in range(2):
                step()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            rows[engine].append(
                (
                    (time.perf_counter() - t0) / 2 * 1e3,
                    (r1.ru_minflt - r0.ru_minflt) / 2,
                    (r1.ru_stime - r0.ru_stime) / 2 * 1e3,
                )
            )
    print(f"freed memory: {freed_memory_policy()}")
    for engine, r in rows.items():
        ms, faults, sys_ms = zip(*r, strict=True)
        q = statistics.quantiles(ms)
        print(
            f"{engine:6s} {statistics.median(ms):5.0f} ms a step (IQR {q[0]:.0f}-{q[2]:.0f}), "
            f"{statistics.median(faults):6.0f} minor faults (min {min(faults):.0f}, max "
            f"{max(faults):.0f}), {statistics.median(sys_ms):4.0f} ms system time"
        )
    ratio = [d[0] / n[0] for d, n in zip(rows["dpseg"], rows["none"], strict=True)]
    q = statistics.quantiles(ratio)
    print(f"dpseg / none {statistics.median(ratio):.3f}x (IQR {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12)
