"""The whole DP step beside its baselines (pytest-benchmark; `make bench`).

Smaller than `dpseg bench` (32^3 instead of 64^3) so the suite stays a few minutes on a
2-core CPU; the ratios, not the absolute times, are what to compare across commits.
"""

import pytest

from dpseg.perf.dp_step import ENGINES, StepBenchConfig, build_workload, make_step

CFG = StepBenchConfig(size=32, batch=2)


@pytest.fixture(scope="module")
def workload():
    return build_workload(CFG)


@pytest.mark.parametrize("engine", ENGINES)
def test_dp_step(benchmark, workload, engine):
    step = make_step(engine, *workload, CFG)
    benchmark.group = f"dp-step UNet{CFG.channels} {CFG.size}^3 batch {CFG.batch}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
