"""Philox Gaussian noise z(seed, step, offset + j), j < numel: the op behind gaussian_noise.

The same bits as dpseg.ops.philox.philox_noise (its reference, below) and the C++ op.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._multi_tensor import from_bits
from ._philox import NO_FMA, noise_keys, philox_noise_run, split_u64

BLOCK = 512


@triton.jit(do_not_specialize=["offset", "seed_lo", "seed_hi", "step_lo", "step_hi"])
def _gaussian_noise_kernel(out_ptr, numel, offset, root_bits, seed_lo, seed_hi, step_lo, step_hi,
                           DRAWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # Programs tile the stream from the even element below offset, so with DRAWS == 1 every
    # Philox block's two normals land in one program (the grid has one more program's worth
    # of lanes when offset is odd; the lane before offset is masked).
    offset = offset.to(tl.int64)
    e0 = offset - (offset & 1) + tl.program_id(0).to(tl.int64) * BLOCK
    j = e0 - offset + tl.arange(0, BLOCK)
    k0, k1, s0, s1 = noise_keys(seed_lo, seed_hi, step_lo, step_hi)
    z = philox_noise_run(e0, s0, s1, k0, k1, from_bits(root_bits), DRAWS, BLOCK)
    tl.store(out_ptr + j, z.to(out_ptr.dtype.element_ty), mask=(j >= 0) & (j < numel))


def gaussian_noise_reference(numel, seed, step, offset, draws, dtype, device) -> torch.Tensor:
    from dpseg.ops.philox import philox_noise as torch_philox_noise

    return torch_philox_noise(numel, seed, step, offset, draws, device=device).to(dtype)


@torch.library.custom_op("dpseg_triton::gaussian_noise_", mutates_args=("out",))
def gaussian_noise_(out: torch.Tensor, seed: int, step: int, offset: int, draws: int) -> None:
    if out.numel() == 0:
        return
    seed_lo, seed_hi = split_u64(seed)
    step_lo, step_hi = split_u64(step)
    _gaussian_noise_kernel[(triton.cdiv(out.numel() + (offset & 1), BLOCK),)](
        out, out.numel(), offset, mt.f64_bits(math.sqrt(draws)),
        seed_lo, seed_hi, step_lo, step_hi, DRAWS=draws, BLOCK=BLOCK, **NO_FMA,
    )  # fmt: skip


@gaussian_noise_.register_fake
def _(out, seed, step, offset, draws):
    return None


def gaussian_noise(numel, seed, step, offset, draws, dtype, device) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype, device=device)
    gaussian_noise_(out, mt.as_int64(seed), step, offset, draws)
    return out
