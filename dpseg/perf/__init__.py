"""One benchmark harness for `dpseg bench`, bench/ and tests, and the CPU memory policy its
commands run under (keep_freed_memory)."""

from dpseg.perf.allocator import freed_memory_policy, keep_freed_memory
from dpseg.perf.dp_step import (
    StepBenchConfig,
    bench_step,
    build_workload,
    format_table,
    make_step,
    run_step_benchmark,
)
from dpseg.perf.harness import environment, peak_memory_call, time_call
from dpseg.perf.user_model import example_batch, load_model

__all__ = [
    "StepBenchConfig",
    "bench_step",
    "example_batch",
    "load_model",
    "build_workload",
    "make_step",
    "environment",
    "format_table",
    "freed_memory_policy",
    "keep_freed_memory",
    "peak_memory_call",
    "run_step_benchmark",
    "time_call",
]
