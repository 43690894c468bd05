"""The audits under the two sabotages the tests apply (tests/test_audit.py), at the sizes of
docs/results/audit_units/run.sh; writes a JSON of the bounds and claims. Not product code:
it monkeypatches the engine to break it on purpose.

    .venv/bin/python docs/results/audit_units/sabotage.py docs/results/audit_units/sabotage.json
"""

from __future__ import annotations

import json
import sys
import time

from dpseg.audit import AuditConfig, run_audit
from dpseg.audit.worlds import WorldsConfig, run_worlds_audit
from dpseg.privacy import sampling_plan
from dpseg.privacy.units import RowUnits, UnitFeed


def main(path: str) -> None:
    results = {}
    # 1. Grouping switched off: each of a canary patient's 4 rows clipped alone.
    original = UnitFeed.for_forward
    UnitFeed.for_forward = lambda self, rows: RowUnits.identity(rows)
    for layout in ("multi-sample", "patients"):
        start = time.perf_counter()
        r = run_audit(
            AuditConfig(noise_multiplier=1.0, trials=50_000, rows_per_canary=4,
                        canary_layout=layout, seed=1)  # fmt: skip
        )
        results[f"rows_clipped_apart_{layout}"] = {
            "epsilon_lower": r.epsilon_lower, "epsilon_claimed": r.epsilon_claimed,
            "trials": r.trials, "seconds": time.perf_counter() - start,
        }  # fmt: skip
        print(layout, results[f"rows_clipped_apart_{layout}"], flush=True)
    UnitFeed.for_forward = original
    # 2. q, steps and divisor derived from N while claiming add/remove (the old behaviour).
    sampling_plan.SamplingPlan.adjacency = property(lambda self: "add/remove")
    start = time.perf_counter()
    w = run_worlds_audit(
        WorldsConfig(noise_multiplier=1.0, runs=500, sample_rate=None, expected_batch_size=None)
    )
    results["n_derived_under_add_remove_claim"] = {
        "epsilon_lower": w.epsilon_lower, "epsilon_claimed": w.epsilon_claimed,
        "bounds": w.bounds, "steps": w.steps, "runs": w.runs,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    print(results["n_derived_under_add_remove_claim"], flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
