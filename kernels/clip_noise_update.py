"""The DP pass fused with the optimizer update: SGD (momentum, Nesterov) and Adam / AdamW.

Unfused, a DP step writes p.grad (P elements), and the optimizer reads it back with the
parameter and its state. Here one program computes its chunk's DP gradient in registers
(exactly as clip_accumulate_noise: float64, rounded once to the parameter's dtype) and
applies torch.optim's update to the parameter and its state in the same pass; the gradient
is still written out (p.grad), as users and schedulers expect to find it.

The update follows torch.optim's single-tensor code (foreach=False) operation by operation,
in the parameter's dtype, with its host-side scalars (step_size, bias corrections) computed
in Python doubles as torch.optim does; ATen's vectorised CPU kernels contract some a + w*b
into FMAs, so the tests hold it to torch.optim within a few float32 ulps, not bit for bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._multi_tensor import from_bits
from ._philox import NO_FMA
from .clip_accumulate_noise import _DTYPES, BLOCK, clipped_noised_sum, noise_args, split_flat

SGD, ADAM = 0, 1


@triton.jit(
    do_not_specialize=["noise_std_bits", "scale_bits", "seed_lo", "seed_hi", "step_lo", "step_hi",
                       "lr_bits", "wd_bits", "a_bits", "b_bits", "c_bits", "d_bits", "e_bits"]
)  # fmt: skip
def _clip_noise_update_kernel(table_ptr, clip_ptr, grad_out_ptr, n_tensors, batch,
                              noise_std_bits, scale_bits, root_bits,
                              seed_lo, seed_hi, step_lo, step_hi,
                              lr_bits, wd_bits, a_bits, b_bits, c_bits, d_bits, e_bits,
                              OPT: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                              DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                              DTYPE: tl.constexpr, HAS_NOISE: tl.constexpr,
                              DRAWS: tl.constexpr, BLOCK: tl.constexpr,
                              TB: tl.constexpr):  # fmt: skip
    row, offs, mask, acc = clipped_noised_sum(
        table_ptr, clip_ptr, n_tensors, batch, from_bits(noise_std_bits), from_bits(scale_bits),
        seed_lo, seed_hi, step_lo, step_hi, from_bits(root_bits),
        DTYPE, HAS_NOISE, DRAWS, BLOCK, TB,
    )  # fmt: skip
    grad = acc.to(DTYPE)
    tl.store(grad_out_ptr + tl.load(row + 4) + offs, grad, mask=mask)
    p_ptr = tl.load(row + 5).to(tl.pointer_type(DTYPE))
    s1_ptr = tl.load(row + 6).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    lr = from_bits(lr_bits).to(DTYPE)
    wd = from_bits(wd_bits).to(DTYPE)
    if MAXIMIZE:
        grad = -grad
    if OPT == 0:
        # SGD: a = momentum, b = 1 - dampening (c, d unused).
        momentum = from_bits(a_bits).to(DTYPE)
        d_p = grad + wd * p
        if FIRST:
            buf = d_p
        else:
            buf = tl.load(s1_ptr + offs, mask=mask, other=0.0)
            buf = buf * momentum + from_bits(b_bits).to(DTYPE) * d_p
        tl.store(s1_ptr + offs, buf, mask=mask)
        if NESTEROV:
            d_p = d_p + momentum * buf
        else:
            d_p = buf
        p = p - lr * d_p
    else:
        # Adam / AdamW: a = 1 - beta1, b = beta2, c = step_size = lr / bias_correction1,
        # d = bias_correction2 ** 0.5, e = eps; lr_bits = 1 - lr * weight_decay (AdamW).
        s2_ptr = tl.load(row + 7).to(tl.pointer_type(DTYPE))
        if DECOUPLED:
            p = p * lr
        else:
            grad = grad + wd * p
        exp_avg = tl.load(s1_ptr + offs, mask=mask, other=0.0)
        exp_avg_sq = tl.load(s2_ptr + offs, mask=mask, other=0.0)
        exp_avg = exp_avg + from_bits(a_bits).to(DTYPE) * (grad - exp_avg)  # lerp, w < 0.5
        one_minus_beta2 = (1.0 - from_bits(b_bits)).to(DTYPE)
        exp_avg_sq = exp_avg_sq * from_bits(b_bits).to(DTYPE) + one_minus_beta2 * grad * grad
        tl.store(s1_ptr + offs, exp_avg, mask=mask)
        tl.store(s2_ptr + offs, exp_avg_sq, mask=mask)
        denom = tl.sqrt(exp_avg_sq) / from_bits(d_bits).to(DTYPE) + from_bits(e_bits).to(DTYPE)
        p = p - (from_bits(c_bits).to(DTYPE) * exp_avg) / denom  # addcdiv: (value * t1) / t2
    tl.store(p_ptr + offs, p, mask=mask)


def _launch(params, grads, states, clip_factors, noise, hyper, **flags):
    """Groups by dtype, launches, and returns the DP gradients (one per parameter)."""
    outs: list[torch.Tensor | None] = [None] * len(params)
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    for dtype, idx in groups.items():
        rows = [mt.rows(grads[i]) for i in idx]
        numels = [r.shape[1] for r in rows]
        flat = torch.empty(sum(numels), dtype=dtype, device=params[idx[0]].device)
        if flat.numel():
            tbl, chunks = mt.table(
                rows, numels, BLOCK, [noise["offsets"][i] for i in idx],
                states=[[params[i] for i in idx]] + [[s[i] for i in idx] for s in states],
            )  # fmt: skip
            _clip_noise_update_kernel[(chunks,)](
                tbl, clip_factors.contiguous(), flat, len(rows), rows[0].shape[0],
                **noise_args(noise["noise_std"], noise["scale"], noise["seed"], noise["step"],
                             noise["draws"]),
                **{k: mt.f64_bits(v) for k, v in hyper.items()},
                **flags, DTYPE=_DTYPES[dtype], HAS_NOISE=noise["noise_std"] != 0.0,
                DRAWS=noise["draws"], BLOCK=BLOCK, TB=mt.table_block(len(rows)), **NO_FMA,
            )  # fmt: skip
        for i, t in zip(idx, split_flat(flat, [params[i].shape for i in idx]), strict=True):
            outs[i] = t
    return outs


def _check(params, grads, states):
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if tuple(g.shape[1:]) != tuple(p.shape) or g.dtype != p.dtype or not p.is_contiguous():
            raise ValueError(
                f"params[{i}] {tuple(p.shape)} {p.dtype} (contiguous={p.is_contiguous()}) does "
                f"not match its per-sample gradient {tuple(g.shape)} {g.dtype}"
            )
        for s in states:
            if s[i].shape != p.shape or s[i].dtype != p.dtype or not s[i].is_contiguous():
                raise ValueError(f"optimizer state of params[{i}] must be like the parameter")


def clip_noise_sgd_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    clip_factors: torch.Tensor,
    *,
    noise_std: float,
    scale: float,
    seed: int,
    step: int,
    draws: int = 1,
    offsets: list[int] | None = None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
) -> list[torch.Tensor]:
    """DP gradient + torch.optim.SGD update in one pass; updates params (and, with momentum,
    momentum_buffers, which first_step initialises as torch.optim does) in place."""
    _check(params, grads, [momentum_buffers] if momentum else [])
    if not momentum:  # plain SGD: the "buffer" is the gradient itself, stored nowhere useful
        momentum_buffers, first_step, nesterov = [torch.empty_like(p) for p in params], True, False
    noise = dict(noise_std=noise_std, scale=scale, seed=seed, step=step, draws=draws,
                 offsets=offsets or _running(grads))  # fmt: skip
    hyper = dict(lr_bits=lr, wd_bits=weight_decay, a_bits=momentum, b_bits=1.0 - dampening,
                 c_bits=0.0, d_bits=0.0, e_bits=0.0)  # fmt: skip
    return _launch(params, grads, [momentum_buffers], clip_factors.double(), noise, hyper,
                   OPT=SGD, FIRST=bool(first_step), NESTEROV=bool(nesterov), DECOUPLED=False,
                   MAXIMIZE=bool(maximize))  # fmt: skip


def clip_noise_adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    clip_factors: torch.Tensor,
    *,
    noise_std: float,
    scale: float,
    seed: int,
    step: int,
    draws: int = 1,
    offsets: list[int] | None = None,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    optimizer_step: int,
) -> list[torch.Tensor]:
    """DP gradient + torch.optim.Adam (AdamW with decoupled_weight_decay) update in one pass.
    ``optimizer_step`` is the optimizer's step count after this step (1 on the first)."""
    _check(params, grads, [exp_avgs, exp_avg_sqs])
    beta1, beta2 = betas
    noise = dict(noise_std=noise_std, scale=scale, seed=seed, step=step, draws=draws,
                 offsets=offsets or _running(grads))  # fmt: skip
    bias_correction1 = 1 - beta1**optimizer_step
    bias_correction2 = 1 - beta2**optimizer_step
    hyper = dict(lr_bits=1 - lr * weight_decay, wd_bits=weight_decay, a_bits=1.0 - beta1,
                 b_bits=beta2, c_bits=lr / bias_correction1, d_bits=bias_correction2**0.5,
                 e_bits=eps)  # fmt: skip
    return _launch(params, grads, [exp_avgs, exp_avg_sqs], clip_factors.double(), noise, hyper,
                   OPT=ADAM, FIRST=False, NESTEROV=False,
                   DECOUPLED=bool(decoupled_weight_decay), MAXIMIZE=bool(maximize))  # fmt: skip


def _running(grads) -> list[int]:
    numels = [math.prod(g.shape[1:]) for g in grads]
    return [sum(numels[:i]) for i in range(len(numels))]


def clip_noise_sgd_reference(params, grads, momentum_buffers, clip_factors, **kw):
    """clip_accumulate_noise (reference) then torch.optim's functional SGD."""
    from dpseg.ops import reference

    g = reference.clip_accumulate_noise(
        grads, clip_factors.double(), kw["noise_std"], kw["scale"], kw["seed"], kw["step"],
        kw.get("draws", 1), kw.get("offsets") or _running(grads),
    )  # fmt: skip
    bufs = [None if kw.get("first_step") else b for b in momentum_buffers]
    from torch.optim.sgd import sgd

    sgd(
        params, g, bufs, foreach=False, weight_decay=kw.get("weight_decay", 0.0),
        momentum=kw.get("momentum", 0.0), lr=kw["lr"], dampening=kw.get("dampening", 0.0),
        nesterov=kw.get("nesterov", False), maximize=kw.get("maximize", False),
    )  # fmt: skip
    for b, new in zip(momentum_buffers, bufs, strict=True):
        if new is not None and new is not b:
            b.copy_(new)
    return g


def clip_noise_adam_reference(params, grads, exp_avgs, exp_avg_sqs, clip_factors, **kw):
    """clip_accumulate_noise (reference) then torch.optim's functional Adam / AdamW."""
    from dpseg.ops import reference

    g = reference.clip_accumulate_noise(
        grads, clip_factors.double(), kw["noise_std"], kw["scale"], kw["seed"], kw["step"],
        kw.get("draws", 1), kw.get("offsets") or _running(grads),
    )  # fmt: skip
    steps = [torch.tensor(float(kw["optimizer_step"] - 1)) for _ in params]
    beta1, beta2 = kw.get("betas", (0.9, 0.999))
    from torch.optim.adam import adam

    adam(
        params, g, exp_avgs, exp_avg_sqs, [], steps, foreach=False, amsgrad=False,
        beta1=beta1, beta2=beta2, lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0),
        eps=kw.get("eps", 1e-8), maximize=kw.get("maximize", False),
        decoupled_weight_decay=kw.get("decoupled_weight_decay", False),
    )  # fmt: skip
    return g
