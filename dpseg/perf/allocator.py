"""Whether the CPU memory a training step frees goes back to the kernel before the next step.

PyTorch's CPU tensors come from the C library's malloc. glibc hands memory back to the kernel
in two ways: it trims the top of its heap once more than a threshold lies free there (128 KiB
at first, then twice the mmap threshold), and it serves blocks at or above its mmap threshold
(128 KiB at first, rising to the largest such block freed, at most 32 MiB) from mappings it
unmaps on free. A training step frees most of what it allocated (activations, gradients) and
asks for the same again in the next step, so the kernel faults in and zeroes that memory
again, 4 KiB at a time, every step.

Measured on the 2-core development VM (docs/results/floor26/malloc10): SegResNet at 48^3,
batch 2, faulted in a median 24k-34k pages a step and spent 52-116 ms of a 600-740 ms step in
the kernel, in proportions that changed with the heap's layout in each process, so the DP
step against the non-private one was 1.10-1.18x in three processes. With the heap kept,
neither step faults, both are faster (the non-private step by 5-10%) and the ratio was
1.06-1.07x in four processes, its upper quartile 1.07-1.10x.

Three policies (``dpseg train``, ``bench``, ``profile``, ``federate``, ``demo`` and ``nnunet
train`` take ``--freed-memory``; the engine, ``make_private``, never changes the allocator):
- ``keep`` (the commands' default on CPU): the heap is never trimmed, and blocks under 32 MiB
  come from it and are reused. Blocks of 32 MiB or more are still mapped per use. Resident
  memory stays at the step's high-water mark between steps; SwinUNETR's high-water mark did
  not move (1320 against 1301 MiB above start).
- ``keep-all``: large blocks come from the heap too (``M_MMAP_MAX`` 0). Fastest for big
  volumes (UNETR at 64^3: 1352 against 2102 ms under ``keep``, 2886 ms returned), but glibc
  before 2.38 cannot serve PyTorch's 64-byte-aligned request from a freed block of exactly
  its size, so the heap grows past the step's peak: SwinUNETR's resident memory settled at
  1.8x of its high-water mark under the other policies. Only where memory is plentiful.
- ``return``: glibc's default.
Code that calls ``make_private`` itself may call ``keep_freed_memory()``, or set
``GLIBC_TUNABLES=glibc.malloc.trim_threshold=18446744073709551615:glibc.malloc.mmap_threshold=
33554432`` (``keep``), which glibc reads at start-up. Threads other than the main one allocate
from their own arenas, whose heaps are at most 64 MiB and are released when wholly free: their
large blocks are mapped per use under every policy.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_NEVER_TRIM = -1  # mallopt's int becomes a size_t: "disables trimming completely" (mallopt(3))
_DEFAULT_MMAP_MAX = 65536  # glibc's
# What glibc's dynamic thresholds settle at on a 64-bit machine (DEFAULT_MMAP_THRESHOLD_MAX,
# and trimming at twice it), and the largest mmap threshold mallopt accepts.
_SETTLED_MMAP, _SETTLED_TRIM = 32 * 1024 * 1024, 64 * 1024 * 1024

POLICIES = ("keep", "keep-all", "return")
_policy = "return"  # what keep_freed_memory last set in this process


@functools.cache
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own C library: no ldconfig lookup
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim")):
        return None
    return libc


def keep_freed_memory(large_blocks: bool = False) -> bool:
    """Keeps the memory a step frees in this process's heap for the next step (glibc only):
    no trimming, and every block under 32 MiB served from the heap (the ``keep`` policy);
    with ``large_blocks``, blocks of 32 MiB and more too (``keep-all``: see the module's
    docstring for its memory cost). Returns whether the policy is in force; False where the C
    library is not glibc, and nothing changes there."""
    global _policy
    libc = _glibc()
    if libc is None:
        return False
    # Setting the trim threshold freezes glibc's dynamic mmap threshold where it stands (128
    # KiB in a young process): fix it at its ceiling so blocks under 32 MiB are heap blocks.
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    ok = ok and libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP) == 1
    ok = ok and libc.mallopt(_M_MMAP_MAX, 0 if large_blocks else _DEFAULT_MMAP_MAX) == 1
    if ok:
        _policy = "keep-all" if large_blocks else "keep"
    return ok


def apply_policy(policy: str) -> bool:
    """``--freed-memory POLICY``: keep_freed_memory for ``keep`` and ``keep-all``; ``return``
    changes nothing. Returns whether the policy asked for is in force."""
    if policy not in POLICIES:
        raise ValueError(
            f"freed-memory policy must be one of {', '.join(POLICIES)}, got {policy!r}"
        )
    if policy == "return":
        return _policy == "return"
    return keep_freed_memory(large_blocks=policy == "keep-all")


def _malloc_tunables() -> dict[str, str]:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    out = {}
    for item in tunables.split(":"):
        name, _, value = item.partition("=")
        if name.startswith("glibc.malloc.") and value:
            out[name[len("glibc.malloc.") :]] = value
    return out


def freed_memory_policy() -> str:
    """What happens to freed CPU memory in this process, for benchmark and profile reports:
    steps are not comparable across policies."""
    if _glibc() is None:
        return f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'}): its default"
    if _policy == "keep":
        return "kept (glibc heap never trimmed; blocks of 32 MiB and more mapped per use)"
    if _policy == "keep-all":
        return "kept, large blocks too (glibc heap never trimmed, nothing mapped per use)"
    tunables = _malloc_tunables()
    if tunables:
        return "glibc with GLIBC_TUNABLES " + ":".join(f"{k}={v}" for k, v in tunables.items())
    return "returned (glibc's default trimming and mmap threshold)"


def _restore(libc) -> None:
    """Puts the process's policy back after a peak measurement: what keep_freed_memory set,
    else what GLIBC_TUNABLES set, else glibc's settled thresholds."""
    if _policy != "return":
        keep_freed_memory(large_blocks=_policy == "keep-all")
        return
    tunables = _malloc_tunables()

    def value(name: str, default: int) -> int:
        try:
            v = int(tunables[name], 0)
        except (KeyError, ValueError):
            return default
        return -1 if v >= 2**31 else v  # mallopt's int: -1 is SIZE_MAX

    libc.mallopt(_M_MMAP_THRESHOLD, min(value("mmap_threshold", _SETTLED_MMAP), _SETTLED_MMAP))
    libc.mallopt(_M_TRIM_THRESHOLD, value("trim_threshold", _SETTLED_TRIM))
    libc.mallopt(_M_MMAP_MAX, value("mmap_max", _DEFAULT_MMAP_MAX))


@contextlib.contextmanager
def released_on_free(threshold: int = 128 * 1024):
    """For measuring a call's peak resident memory (dpseg.perf.harness.peak_memory_call):
    the heap is trimmed first, every new block of ``threshold`` bytes or more is its own
    mapping, unmapped on free, and a free top of more than ``threshold`` is trimmed, as in a
    young process under glibc's defaults, so a freed tensor leaves the resident set and the
    call's peak does not depend on the process's policy. Afterwards the policy is back
    (_restore). No-op off glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, threshold)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        _restore(libc)


def child_environment() -> dict[str, str]:
    """GLIBC_TUNABLES that give a child process (a Flower SuperNode started by ``dpseg
    federate --runtime flower``) this process's policy; empty when it keeps glibc's default."""
    if _policy == "return":
        return {}
    ours = [
        f"glibc.malloc.trim_threshold={2**64 - 1}",
        f"glibc.malloc.mmap_threshold={_SETTLED_MMAP}",
    ]
    if _policy == "keep-all":
        ours.append("glibc.malloc.mmap_max=0")
    names = {t.split("=", 1)[0] for t in ours}
    theirs = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    kept = [t for t in theirs if t.split("=", 1)[0] not in names]
    return {"GLIBC_TUNABLES": ":".join(kept + ours)}
