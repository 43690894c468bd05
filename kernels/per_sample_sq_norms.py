"""Per-sample squared gradient norms over a list of tensors, in one multi-tensor launch.

    out[b] = sum_i sum_j G_i[b, j]^2      (float64, shape (B,))

Program ``pid`` owns one chunk of BLOCK elements of one tensor and writes, for every sample,
the float64 sum of squares of that chunk into ``partial[b, pid]`` (a two-pass reduction: no
atomics, so the result does not depend on scheduling); a row sum finishes it. Each row of a
chunk is a contiguous BLOCK-element read, and the B rows of a chunk are read back to back,
so the pass streams B x P elements once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._multi_tensor import block_sum, locate

BLOCK = 1024
_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
           torch.float16: tl.float16}  # fmt: skip


@triton.jit
def _sq_norms_kernel(table_ptr, partial_ptr, n_tensors, batch, n_chunks,
                     DTYPE: tl.constexpr, BLOCK: tl.constexpr, TB: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    row, offs, mask = locate(table_ptr, n_tensors, pid, BLOCK, TB)
    g_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + 1)
    for b in range(batch):
        g = tl.load(g_ptr + b * numel + offs, mask=mask, other=0.0).to(tl.float64)
        tl.store(partial_ptr + b * n_chunks + pid, block_sum(g * g))


def per_sample_sq_norms_reference(grads: list[torch.Tensor]) -> torch.Tensor:
    """The pure-PyTorch oracle: float64 sums of squares per sample."""
    out = torch.zeros(grads[0].shape[0], dtype=torch.float64, device=grads[0].device)
    for g in grads:
        out = out + mt.rows(g).double().square().sum(dim=1)
    return out


@torch.library.custom_op("dpseg_triton::per_sample_sq_norms", mutates_args=())
def per_sample_sq_norms_op(grads: list[torch.Tensor]) -> torch.Tensor:
    batch = grads[0].shape[0]
    out = torch.zeros(batch, dtype=torch.float64, device=grads[0].device)
    if batch == 0:
        return out
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        if g[0].numel():
            by_dtype.setdefault(g.dtype, []).append(mt.rows(g))
    for dtype, rows in by_dtype.items():
        tbl, chunks = mt.table(rows, [r.shape[1] for r in rows], BLOCK)
        partial = torch.empty((batch, chunks), dtype=torch.float64, device=out.device)
        _sq_norms_kernel[(chunks,)](
            tbl, partial, len(rows), batch, chunks,
            DTYPE=_DTYPES[dtype], BLOCK=BLOCK, TB=mt.table_block(len(rows)),
        )  # fmt: skip
        out = out + partial.sum(dim=1)
    return out


@per_sample_sq_norms_op.register_fake
def _(grads):
    return grads[0].new_empty((grads[0].shape[0],), dtype=torch.float64)


def per_sample_sq_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    return per_sample_sq_norms_op(list(grads))
