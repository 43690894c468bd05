"""Whether the CPU memory a training step frees goes back to the kernel before the next step.

PyTorch's CPU tensors come from the C library's malloc. glibc's hands memory back to the
kernel in two ways: it trims the top of its heap once more than a threshold lies free there
(by default twice its mmap threshold), and it serves blocks at or above the mmap threshold
(128 KiB at first, rising to the largest such block freed, at most 32 MiB) from mappings it
unmaps on free. A training step frees most of what it allocated (activations, gradients) and
asks for the same again in the next step, so the kernel faults in and zeroes that memory
again, 4 KiB at a time, every step.

Measured on the 2-core development VM (docs/results/floor26/malloc10): SegResNet at 48^3,
batch 2, faulted in 24k-34k pages a step (a median; up to 50k) and spent 52-116 ms of a
590-740 ms step in the kernel, in proportions that changed with the heap's layout in each
process, so the DP step against the non-private one ranged 1.10-1.20x between processes.
With the heap kept, neither step faults, both are faster (the non-private SegResNet step by
5-10%, UNETR's at 64^3 by half) and the ratio was 1.06-1.07x in every process.

``keep_freed_memory()`` keeps it for the rest of the process: freed blocks stay in the heap
for the next step, as PyTorch's CUDA caching allocator keeps GPU memory. The price is that
the process's resident memory stays at its peak between steps, which a training loop reaches
again every step anyway. ``dpseg train``, ``bench``, ``profile``, ``federate``, ``demo`` and
``nnunet train`` call it unless given ``--freed-memory return`` (dpseg.cli_types); code that
calls ``make_private`` itself may call it, or set ``GLIBC_TUNABLES=glibc.malloc.trim_threshold
=2147483647:glibc.malloc.mmap_max=0``, which glibc reads at start-up. dpseg's engine never
changes the allocator by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# mallopt takes an int: trim only when more than 2 GiB lies free at the heap's top.
_NEVER_TRIM = 2**31 - 1
_DEFAULT_MMAP_MAX = 65536  # glibc's
# What glibc's dynamic thresholds settle at on a 64-bit machine (DEFAULT_MMAP_THRESHOLD_MAX,
# and trimming at twice it): where a peak measurement leaves a process that keeps nothing.
_SETTLED_MMAP, _SETTLED_TRIM = 32 * 1024 * 1024, 64 * 1024 * 1024

_kept = False


@functools.cache
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Keeps freed memory in this process's heap (glibc only): no trimming of the heap's top,
    and no separate mappings for large blocks (so they are reused too). Returns whether the
    policy is in force; False where the C library is not glibc, and nothing changes there."""
    global _kept
    libc = _glibc()
    if libc is None:
        return False
    # Both must hold: a block served by mmap is unmapped on free whatever the trim threshold.
    if libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) != 1 or libc.mallopt(_M_MMAP_MAX, 0) != 1:
        return False
    _kept = True
    return True


def freed_memory_policy() -> str:
    """What happens to freed CPU memory in this process, for benchmark and profile reports:
    steps are not comparable across policies."""
    if _glibc() is None:
        return f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'}): its default"
    if _kept:
        return "kept (glibc, dpseg keep_freed_memory)"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    malloc = [t for t in tunables.split(":") if t.startswith("glibc.malloc.")]
    if malloc:
        return "glibc with GLIBC_TUNABLES " + ":".join(malloc)
    return "returned (glibc's default trimming and mmap threshold)"


@contextlib.contextmanager
def released_on_free(threshold: int = 128 * 1024):
    """For measuring a call's peak resident memory (dpseg.perf.harness.peak_memory_call):
    every block of ``threshold`` bytes or more is its own mapping, unmapped on free, and the
    heap is trimmed first, so a freed tensor leaves the resident set at once and the call
    starts from a clean baseline. Afterwards the process's policy is back: kept if
    keep_freed_memory() was called, else glibc's settled thresholds. No-op off glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP)
        if _kept:
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
            libc.mallopt(_M_MMAP_MAX, 0)
        else:
            libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM)
