"""dpseg.perf.allocator: whether freed CPU memory is kept for the next step. Each case runs in
a fresh interpreter, since the policy holds for the rest of a process."""

import json
import subprocess
import sys
import textwrap

import pytest

from dpseg.perf.allocator import _glibc

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="the policy is glibc's mallopt")

# What a training step does to the allocator: frees a large buffer and asks for it again.
# Counts the minor page faults of the last round (the kernel zero-filling fresh pages).
_ROUNDS = """
import json, resource, sys
import torch
from dpseg.perf.allocator import freed_memory_policy, keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else False
sizes = [48 * 2**20, 3 * 2**20, 40 * 2**20]  # over, under and near glibc's 32 MiB mmap limit
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for size in sizes:
        torch.ones(size // 4)  # touched, then freed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults, "policy": freed_memory_policy()}))
"""


def _run(code: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_kept_memory_is_not_faulted_in_again_and_returned_memory_is():
    pages = sum([48, 3, 40]) * 2**20 // 4096
    returned = _run(_ROUNDS, "return")
    kept = _run(_ROUNDS, "keep")
    # glibc's default unmaps the blocks over its mmap threshold: they fault in every round.
    assert returned["faults"] > 0.8 * (48 + 40) * 2**20 / 4096
    assert returned["policy"].startswith("returned")
    assert kept["kept"] is True and kept["policy"].startswith("kept")
    assert kept["faults"] < 0.02 * pages


@needs_glibc
def test_peak_memory_is_measured_alike_under_both_policies_and_the_policy_comes_back():
    code = """
    import json, resource, sys
    import torch
    from dpseg.perf.allocator import keep_freed_memory
    from dpseg.perf.harness import cpu_peak_supported, peak_memory_call

    if sys.argv[1] == "keep":
        keep_freed_memory()
    size = 64 * 2**20
    for _ in range(2):
        torch.ones(size // 4)  # the heap holds 64 MiB free when kept
    peak = peak_memory_call(lambda: torch.ones(size // 4)) if cpu_peak_supported() else None
    idle = peak_memory_call(lambda: None) if cpu_peak_supported() else None
    for _ in range(3):  # glibc's bins take a round or two to settle (memalign's padding)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(size // 4)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"peak": peak, "idle": idle, "faults": faults}))
    """
    size = 64 * 2**20
    for policy in ("return", "keep"):
        r = _run(code, policy)
        if r["peak"] is not None:
            assert 0.9 * size <= r["peak"] <= 1.2 * size, (policy, r)
            assert r["idle"] < 0.1 * size, (policy, r)
        # After the measurement the process's own policy holds again.
        if policy == "keep":
            assert r["faults"] < 0.02 * size / 4096, r
        else:
            assert r["faults"] > 0.8 * size / 4096, r


@needs_glibc
def test_bench_keeps_freed_memory_unless_told_and_says_which(tmp_path):
    code = """
    import json, sys
    from dpseg.cli import main

    out = sys.argv[1]
    args = ["bench", "--size", "8", "--channels", "4,8", "--engines", "none", "--repeats", "1",
            "--warmup", "0", "--out", out] + sys.argv[2:]
    assert main(args) == 0
    with open(out + "/dp_step_cpu.json") as f:
        print(json.dumps(json.load(f)[0]["environment"]))
    """
    kept = _run(code, str(tmp_path / "a"))
    returned = _run(code, str(tmp_path / "b"), "--freed-memory", "return")
    assert kept["freed_memory"].startswith("kept")
    assert returned["freed_memory"].startswith("returned")
