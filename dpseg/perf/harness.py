"""Timing and peak-memory measurement shared by `dpseg bench`, bench/ and tests.

Time: wall clock around a callable, after warm-up, median and 20th/80th percentiles (one
number hides the noise of a shared machine). On CUDA the device is synchronised around it.

Peak memory of one call, measured the same way for every workload in the process:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory
  allocated before the call.
- CPU: torch keeps no CPU allocator statistics, so the Linux high-water mark of resident
  memory is used (VmHWM, reset through /proc/self/clear_refs), minus the resident memory
  before the call. For that phase only, every allocation over 128 KiB is its own mapping
  (dpseg.perf.allocator.released_on_free), so a freed tensor leaves the resident set at once
  and the next workload starts from a clean baseline. Timing runs outside it, under the
  process's policy for freed memory (dpseg.perf.allocator: kept by `dpseg bench`, else
  glibc's default), which every report records: with memory returned to the kernel, every
  step's tensors are fresh pages that fault in, which inflates absolute times and makes the
  DP/none ratio depend on the heap's layout in that process.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpseg.perf.allocator import freed_memory_policy, released_on_free


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    repeats: int
    p25_s: float | None = None  # the interquartile range
    p75_s: float | None = None

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        qs = (
            statistics.quantiles(samples, n=20, method="inclusive")
            if len(samples) > 1
            else samples * 19
        )
        return cls(statistics.median(samples), qs[3], qs[15], len(samples), qs[4], qs[14])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 2, device="cpu") -> Timing:
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


# --- peak memory ------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_supported() -> bool:
    return platform.system() == "Linux" and os.access("/proc/self/clear_refs", os.W_OK)


def peak_memory_call(fn: Callable[[], object], device="cpu") -> int | None:
    """Bytes by which one call of ``fn`` raised memory at its peak (None if unmeasurable)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not cpu_peak_supported():
        return None
    with released_on_free():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) * 1024


# --- where a figure came from -----------------------------------------------------------
def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device="cpu") -> dict:
    device = torch.device(device)
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for module in ("triton", "opacus"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                env["device"] = next(
                    line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
                )
        except (OSError, StopIteration):
            pass
        env["huge_pages"] = huge_pages()
        env["freed_memory"] = freed_memory_policy()
    return env


def huge_pages() -> str:
    """Whether PyTorch's CPU tensors sit on 2 MiB pages: the kernel's transparent huge page
    mode, and PyTorch's THP_MEM_ALLOC_ENABLE (under "madvise", the kernel's usual default,
    only that variable asks for them). On the 2-core development VM they made CNN steps
    steadier and faster (SegResNet at 48^3: 4-7% non-private, 15-20% DP) and transformer
    steps jittery (docs/results/floor26/spread9): results are not comparable across modes."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        mode = "unknown"
    asked = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")
    return f"kernel {mode}, THP_MEM_ALLOC_ENABLE={'1' if asked else 'unset'}"


def append_result(path: Path, record: dict) -> None:
    """Appends one JSON record per line, so results accumulate across commits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def to_dict(obj) -> dict:
    return asdict(obj)
