"""Multi-tensor launches: one kernel over every tensor of a list, through a table of pointers.

A DP step touches every parameter of the model: a 3D U-Net has ~50 tensors from 32 biases to
1.8M-element convs. One launch per tensor costs ~5 us each on a GPU and leaves the small ones
with a one-block grid; instead each launch gets a table with one row per tensor

    [grad ptr, numel P, noise offset, first chunk, output start, state ptr 0, 1, 2]

and program ``pid`` finds its tensor by counting the rows whose first chunk is <= pid (one
vector compare over the table, no search loop). Chunks are BLOCK elements of one tensor, so
the work per program is the same for big and small tensors.

Raw pointers hide the tensors from torch.compile's dependency analysis, so the ops built on
these tables are opaque ``torch.library.custom_op``s (with fakes), not ``triton_op``s;
kernels that take their tensors as arguments (conv_weight_grad) are ``triton_op``s.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# Columns of a table row.
PTR, NUMEL, NOISE_OFFSET, FIRST_CHUNK, OUT_START, STATE0, STATE1, STATE2 = range(8)
ROW = 8
_FAR = 1 << 62


def f64_bits(x: float) -> int:
    """The IEEE bits of a float64 as a signed int64: Triton passes Python floats as float32,
    so float64 scalars travel as bits and ``from_bits`` restores them exactly."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def as_int64(seed: int) -> int:
    """A uint64 seed in the two's complement int64 that op schemas carry."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def rows(g: torch.Tensor) -> torch.Tensor:
    """(B, P) contiguous view of a per-sample gradient (copies only non-contiguous ones)."""
    return g.reshape(g.shape[0], math.prod(g.shape[1:])).contiguous()


def table(
    tensors: Sequence[torch.Tensor],
    numels: Sequence[int],
    block: int,
    noise_offsets: Sequence[int] | None = None,
    states: Sequence[Sequence[torch.Tensor]] = (),
    device: torch.device | None = None,
) -> tuple[torch.Tensor, int]:
    """(the int64 table on ``device``, number of chunks = programs)."""
    out, chunk, start = [], 0, 0
    for i, (t, p) in enumerate(zip(tensors, numels, strict=True)):
        row = [0] * ROW
        row[PTR] = t.data_ptr()
        row[NUMEL] = p
        row[NOISE_OFFSET] = noise_offsets[i] if noise_offsets is not None else 0
        row[FIRST_CHUNK] = chunk
        row[OUT_START] = start
        for k, column in enumerate(states):
            row[STATE0 + k] = column[i].data_ptr()
        out.append(row)
        chunk += triton.cdiv(p + (row[NOISE_OFFSET] & 1), block)  # locate's odd-offset shift
        start += p
    host = torch.tensor(out, dtype=torch.int64)
    device = torch.device(device) if device is not None else tensors[0].device
    if device.type == "cuda":  # pinned + non_blocking: no host-device synchronisation
        return host.pin_memory().to(device, non_blocking=True), chunk
    return host, chunk


def table_block(n_tensors: int) -> int:
    return max(16, triton.next_power_of_2(n_tensors))


@triton.jit
def locate(table_ptr, n_tensors, pid, BLOCK: tl.constexpr, TB: tl.constexpr):
    """(row pointer, element offsets of this program's chunk, mask) for program pid.

    A tensor's chunks start one element early when its noise offset is odd, so every chunk
    begins at an even element of the noise stream and each Philox block's two normals fall in
    one chunk (see ``table``); that first lane is masked."""
    rows = tl.arange(0, TB)
    first = tl.load(table_ptr + rows * 8 + 3, mask=rows < n_tensors, other=1 << 62)
    t = block_sum((first <= pid).to(tl.int32)) - 1
    row = table_ptr + t.to(tl.int64) * 8
    numel = tl.load(row + 1)
    shift = tl.load(row + 2) & 1
    offs = (pid - tl.load(row + 3)) * BLOCK - shift + tl.arange(0, BLOCK).to(tl.int64)
    return row, offs, (offs >= 0) & (offs < numel)


# Kernels use only triton.language builtins and these helpers, not the library's own
# @jit functions (tl.sum, tl.cdiv, tl.zeros...): those are decorated when triton is first
# imported, so in a process that imported triton before setting TRITON_INTERPRET=1 (a test
# session) they stay compiled-only and an interpreted kernel cannot call them.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def block_sum(x):
    """Sum of a 1-D block (tl.reduce with our own combine function)."""
    return tl.reduce(x, 0, _add)


@triton.jit
def from_bits(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)
