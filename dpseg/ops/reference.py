"""The pure-PyTorch backend: the oracle every other backend is held to, and the fallback.

Inputs arrive validated (dpseg.ops.dispatch). The float64 operation order is the contract of
the fused op, spelled out one tensor op at a time so that each rounds exactly once:
    acc = 0.0; acc = acc + c_b * G[b] for b = 0 .. B-1; acc = acc + noise_std * z; acc * scale,
then one rounding to G's dtype. The C++ kernels follow the same order, so they agree bit for bit.
Runs on any device.
"""

from __future__ import annotations

import math

import torch

from .philox import philox_noise


def _rows(g: torch.Tensor) -> torch.Tensor:
    # reshape(B, -1) fails for B == 0; the parameter size is known from the shape.
    return g.reshape(g.shape[0], math.prod(g.shape[1:]))


def per_sample_sq_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    batch = grads[0].shape[0]
    out = torch.zeros(batch, dtype=torch.float64, device=grads[0].device)
    for g in grads:
        out = out + _rows(g).to(torch.float64).square().sum(dim=1)
    return out


def clip_accumulate_noise(
    grads: list[torch.Tensor],
    clip_factors: torch.Tensor,
    noise_std: float,
    scale: float,
    seed: int,
    step: int,
    draws: int,
    offsets: list[int],
) -> list[torch.Tensor]:
    outs = []
    for g, offset in zip(grads, offsets, strict=True):
        rows = _rows(g)
        acc = torch.zeros(rows.shape[1], dtype=torch.float64, device=g.device)
        # A Python loop over the batch fixes the summation order b = 0, 1, ..., B-1.
        for b in range(rows.shape[0]):
            acc = acc + clip_factors[b] * rows[b].to(torch.float64)
        if noise_std != 0.0:
            z = philox_noise(rows.shape[1], seed, step, offset, draws, device=g.device)
            acc = acc + noise_std * z
        outs.append((acc * scale).to(g.dtype).reshape(g.shape[1:]))
    return outs


def gaussian_noise(
    numel: int, seed: int, step: int, offset: int, draws: int, dtype: torch.dtype, device
) -> torch.Tensor:
    return philox_noise(numel, seed, step, offset, draws, device=device).to(dtype)
