"""The fused DP pass: clip, sum over the batch, add Philox noise, scale; one launch per dtype.

    out_i[j] = scale * (sum_b c_b G_i[b, j] + noise_std * z(seed, step, offsets[i] + j))

in float64, in the contract's order (b = 0, 1, ..., B-1, then the noise, then the scale),
rounded once to G_i's dtype: the same bits as the pure-PyTorch reference and the C++ op
(launched with ``enable_fp_fusion=False``, so no multiply-add is contracted). Program
``pid`` owns one BLOCK-element chunk of one tensor (see _multi_tensor) and streams its B rows
through a float64 accumulator held in registers: B x P reads and P writes, the minimum.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._multi_tensor import from_bits, locate
from ._philox import NO_FMA, noise_keys, philox_noise_run, split_u64

BLOCK = 512  # float64 accumulator + noise temporaries: 512 keeps it in registers at 4 warps
_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def clipped_noised_sum(table_ptr, clip_ptr, n_tensors, batch, noise_std, scale,
                       seed_lo, seed_hi, step_lo, step_hi, root,
                       DTYPE: tl.constexpr, HAS_NOISE: tl.constexpr, DRAWS: tl.constexpr,
                       BLOCK: tl.constexpr, TB: tl.constexpr):  # fmt: skip
    """(row, offs, mask, scale * (sum_b c_b g_b + noise_std z)) for this program's chunk."""
    pid = tl.program_id(0)
    row, offs, mask = locate(table_ptr, n_tensors, pid, BLOCK, TB)
    g_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + 1)
    acc = tl.full([BLOCK], 0.0, tl.float64)
    for b in range(batch):
        c = tl.load(clip_ptr + b)
        g = tl.load(g_ptr + b * numel + offs, mask=mask, other=0.0).to(tl.float64)
        acc = acc + c * g
    if HAS_NOISE:
        k0, k1, s0, s1 = noise_keys(seed_lo, seed_hi, step_lo, step_hi)
        noise_offset = tl.load(row + 2)
        e0 = noise_offset - (noise_offset & 1) + (pid - tl.load(row + 3)) * BLOCK  # even
        z = philox_noise_run(e0, s0, s1, k0, k1, root, DRAWS, BLOCK)
        acc = acc + noise_std * z
    return row, offs, mask, acc * scale


@triton.jit(
    do_not_specialize=["noise_std_bits", "scale_bits", "seed_lo", "seed_hi", "step_lo", "step_hi"]
)
def _clip_accumulate_noise_kernel(table_ptr, clip_ptr, out_ptr, n_tensors, batch,
                                  noise_std_bits, scale_bits, root_bits,
                                  seed_lo, seed_hi, step_lo, step_hi,
                                  DTYPE: tl.constexpr, HAS_NOISE: tl.constexpr,
                                  DRAWS: tl.constexpr, BLOCK: tl.constexpr,
                                  TB: tl.constexpr):  # fmt: skip
    row, offs, mask, out = clipped_noised_sum(
        table_ptr, clip_ptr, n_tensors, batch, from_bits(noise_std_bits), from_bits(scale_bits),
        seed_lo, seed_hi, step_lo, step_hi, from_bits(root_bits),
        DTYPE, HAS_NOISE, DRAWS, BLOCK, TB,
    )  # fmt: skip
    tl.store(out_ptr + tl.load(row + 4) + offs, out.to(DTYPE), mask=mask)


def noise_args(noise_std: float, scale: float, seed: int, step: int, draws: int) -> dict:
    """The scalar kernel arguments shared by the clip kernels (float64s as bits)."""
    seed_lo, seed_hi = split_u64(seed)
    step_lo, step_hi = split_u64(step)
    return dict(
        noise_std_bits=mt.f64_bits(noise_std),
        scale_bits=mt.f64_bits(scale),
        root_bits=mt.f64_bits(math.sqrt(draws)),
        seed_lo=seed_lo,
        seed_hi=seed_hi,
        step_lo=step_lo,
        step_hi=step_hi,
    )


def clip_accumulate_noise_reference(
    grads, clip_factors, noise_std, scale, seed, step, draws, offsets
) -> list[torch.Tensor]:
    """The pure-PyTorch oracle (dpseg.ops.reference), same contract and bits."""
    from dpseg.ops import reference

    return reference.clip_accumulate_noise(
        grads, clip_factors, noise_std, scale, seed, step, draws, offsets
    )


@torch.library.custom_op("dpseg_triton::clip_accumulate_noise_flat", mutates_args=())
def clip_accumulate_noise_flat(
    grads: list[torch.Tensor],
    clip_factors: torch.Tensor,
    noise_std: float,
    scale: float,
    seed: int,
    step: int,
    draws: int,
    offsets: list[int],
) -> torch.Tensor:
    """All outputs of one dtype concatenated: (sum_i P_i,). grads share one dtype."""
    rows = [mt.rows(g) for g in grads]
    numels = [r.shape[1] for r in rows]
    out = torch.empty(sum(numels), dtype=grads[0].dtype, device=grads[0].device)
    if out.numel() == 0:
        return out
    tbl, chunks = mt.table(rows, numels, BLOCK, offsets)
    _clip_accumulate_noise_kernel[(chunks,)](
        tbl, clip_factors.contiguous(), out, len(rows), grads[0].shape[0],
        **noise_args(noise_std, scale, seed, step, draws),
        DTYPE=_DTYPES[out.dtype], HAS_NOISE=noise_std != 0.0, DRAWS=draws, BLOCK=BLOCK,
        TB=mt.table_block(len(rows)), **NO_FMA,
    )  # fmt: skip
    return out


@clip_accumulate_noise_flat.register_fake
def _(grads, clip_factors, noise_std, scale, seed, step, draws, offsets):
    return grads[0].new_empty((sum(math.prod(g.shape[1:]) for g in grads),))


def split_flat(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    out, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[start : start + n].view(shape))
        start += n
    return out


def by_dtype(grads) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.dtype, []).append(i)
    return groups


def clip_accumulate_noise(
    grads, clip_factors, noise_std, scale, seed, step, draws, offsets
) -> list[torch.Tensor]:
    """dpseg.ops backend entry (inputs validated there). Seeds are uint64 Python ints."""
    outs: list[torch.Tensor | None] = [None] * len(grads)
    for idx in by_dtype(grads).values():
        flat = clip_accumulate_noise_flat(
            [grads[i] for i in idx], clip_factors, noise_std, scale,
            mt.as_int64(seed), step, draws, [offsets[i] for i in idx],
        )  # fmt: skip
        for i, t in zip(idx, split_flat(flat, [grads[i].shape[1:] for i in idx]), strict=True):
            outs[i] = t
    return outs
