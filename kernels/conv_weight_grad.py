"""Per-sample weight gradients of Conv1/2/3d and ConvTranspose1/2/3d as an implicit GEMM.

For sample n and group g, both conv and transposed conv have the same shape of gradient:

    dW[n, a, c, k] = sum_r  A[n, g*Ag + a, r] * Bt[n, g*Bg + c, r*stride - padding + k*dilation]

conv:            A = grad_out (r runs over output voxels), Bt = x,         dW = (Cout, Cin/G, k)
conv transposed: A = x        (r runs over input voxels),  Bt = grad_out,  dW = (Cin, Cout/G, k)

a GEMM of M = Ag rows, N = Bg * prod(k) columns and a reduction over r, the voxels: 128^3 = 2M
per sample, against M, N of 32..256 and 32..6912. Each program computes one (BLOCK_M,
BLOCK_N) tile of one (sample, group) over one of SPLIT slices of the voxels; the Bt tile is
gathered on the fly from the index arithmetic above (zero outside the volume), so the input
is never unfolded (Opacus's unfold3d materialises 27x the activation for a 3x3x3 kernel).
Split-K partial tiles meet through float32 atomic adds into a zeroed output. With SPLIT = 1
each tile is final, and the kernel can add its sum of squares to the sample's squared norm
(``sq_norms``) on the way; otherwise the norm is one extra read of the (small) result.
fp32 inputs multiply in IEEE fp32 (tf32 when torch.backends.cudnn.allow_tf32, as cuDNN's own
weight gradient does); bf16/fp16 inputs (autocast) multiply in their dtype, accumulate fp32
(under the CPU interpreter, whose bf16 tl.dot returns garbage in triton 3.9, they are widened
to fp32 first: exact, as bf16 x bf16 products fit fp32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._multi_tensor import block_sum


@triton.jit
def _conv_weight_grad_kernel(
    a_ptr, b_ptr, out_ptr, norm_ptr,
    CA, CB, Ag, Bg, G,
    RD, RH, RW, BD, BH, BW,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD, SH, SW, PD, PH, PW, DD, DH, DW,
    r_per_split,
    SPLIT: tl.constexpr, NORMS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    KVOL: tl.constexpr = KD * KH * KW
    ncol = Bg * KVOL
    n_tiles_n = (ncol + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0) // n_tiles_n
    pid_n = tl.program_id(0) % n_tiles_n
    n = tl.program_id(1) // G
    g = tl.program_id(1) % G
    r_lo = tl.program_id(2) * r_per_split
    R = RD * RH * RW
    r_hi = tl.minimum(r_lo + r_per_split, R)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = rn // KVOL
    kr = rn % KVOL
    kd = kr // (KH * KW)
    kh = (kr // KW) % KH
    kw = kr % KW
    m_ok = rm < Ag
    n_ok = rn < ncol
    S = BD * BH * BW
    a_base = a_ptr + (n.to(tl.int64) * CA + g * Ag) * R
    b_base = b_ptr + (n.to(tl.int64) * CB + g * Bg) * S
    a_rows = rm.to(tl.int64)[:, None] * R
    b_cols = c.to(tl.int64)[None, :] * S
    off_d = kd * DD - PD
    off_h = kh * DH - PH
    off_w = kw * DW - PW

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        r_ok = rr < r_hi
        a = tl.load(a_base + a_rows + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        od = rr // (RH * RW)
        oh = (rr // RW) % RH
        ow = rr % RW
        pd = od[:, None] * SD + off_d[None, :]
        ph = oh[:, None] * SH + off_h[None, :]
        pw = ow[:, None] * SW + off_w[None, :]
        ok = (pd >= 0) & (pd < BD) & (ph >= 0) & (ph < BH) & (pw >= 0) & (pw < BW)
        ok = ok & r_ok[:, None] & n_ok[None, :]
        b = tl.load(b_base + b_cols + (pd * BH + ph) * BW + pw, mask=ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out = out_ptr + ((n.to(tl.int64) * CA + g * Ag + rm)[:, None] * ncol + rn[None, :])
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 1:
        tl.store(out, acc, mask=ok)
        if NORMS:
            sq = block_sum(tl.reshape(tl.where(ok, acc * acc, 0.0), [BLOCK_M * BLOCK_N]))
            tl.atomic_add(norm_ptr + n, sq.to(tl.float64))
    else:
        tl.atomic_add(out, acc, mask=ok)


def _as_3d(values: Sequence[int], nd: int, fill: int) -> list[int]:
    return [fill] * (3 - nd) + list(values)


def _spatial_3d(t: torch.Tensor) -> torch.Tensor:
    nd = t.dim() - 2
    return t.reshape(*t.shape[:2], *([1] * (3 - nd)), *t.shape[2:])


def choose_tiles(ag: int, ncol: int, r: int, programs_mn: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT, num_warps). Heuristic, not yet tuned on a GPU:
    tiles as large as M and N allow (tl.dot needs >= 16), and enough voxel slices that the
    grid fills the GPU about four times over."""
    block_m = min(64, max(16, triton.next_power_of_2(ag)))
    block_n = min(64, max(16, triton.next_power_of_2(ncol)))
    block_k = 32 if device.type == "cuda" else 16
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = programs_mn * triton.cdiv(ag, block_m) * triton.cdiv(ncol, block_n)
        split = max(1, min(triton.cdiv(4 * sms, tiles), triton.cdiv(r, 8 * block_k)))
    else:
        split = 1 if r <= 4 * block_k else 2
    return block_m, block_n, block_k, split, 4


@triton_op("dpseg_triton::per_sample_conv_weight_grad", mutates_args=())
def per_sample_conv_weight_grad_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    groups: int,
    split: int,
    want_norms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW per sample, float32 (B, *weight_shape); squared norms, float64 (B,) or empty)."""
    nd = len(weight_shape) - 2
    a, bt = (x, grad_out) if transposed else (grad_out, x)
    if a.dtype != bt.dtype:  # autocast can hand over mixed dtypes: multiply in the wider
        common = torch.promote_types(a.dtype, bt.dtype)
        a, bt = a.to(common), bt.to(common)
    a, bt = _spatial_3d(a.contiguous()), _spatial_3d(bt.contiguous())
    batch, ca, cb = a.shape[0], a.shape[1], bt.shape[1]
    ag, bg = ca // groups, cb // groups
    kd, kh, kw = _as_3d(weight_shape[2:], nd, 1)
    ncol = bg * kd * kh * kw
    r = math.prod(a.shape[2:])
    out = torch.zeros((batch, *weight_shape), dtype=torch.float32, device=a.device)
    norms = torch.zeros(batch if want_norms else 0, dtype=torch.float64, device=a.device)
    if batch == 0 or out.numel() == 0:
        return out, norms
    bm, bn, bk, auto_split, warps = choose_tiles(ag, ncol, r, batch * groups, a.device)
    split = auto_split if split <= 0 else split
    r_per_split = triton.cdiv(triton.cdiv(r, split), bk) * bk
    split = triton.cdiv(r, r_per_split)
    precision = "ieee"
    if a.dtype == torch.float32 and a.is_cuda and torch.backends.cudnn.allow_tf32:
        precision = "tf32"
    grid = (triton.cdiv(ag, bm) * triton.cdiv(ncol, bn), batch * groups, split)
    fused_norms = want_norms and split == 1
    wrap_triton(_conv_weight_grad_kernel)[grid](
        a, bt, out, norms if fused_norms else out,
        ca, cb, ag, bg, groups,
        *a.shape[2:], *bt.shape[2:], kd, kh, kw,
        *_as_3d(stride, nd, 1), *_as_3d(padding, nd, 0), *_as_3d(dilation, nd, 1),
        r_per_split,
        SPLIT=split, NORMS=fused_norms, PRECISION=precision,
        UPCAST=a.dtype != torch.float32 and not a.is_cuda,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    if want_norms and not fused_norms:
        norms = out.reshape(batch, -1).double().square().sum(dim=1)
    return out, norms


@per_sample_conv_weight_grad_op.register_fake
def _(grad_out, x, weight_shape, stride, padding, dilation, transposed, groups, split, want_norms):
    batch = x.shape[0]
    out = x.new_empty((batch, *weight_shape), dtype=torch.float32)
    return out, x.new_empty((batch if want_norms else 0,), dtype=torch.float64)


def per_sample_conv_weight_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    split: int = 0,
    want_norms: bool = False,
):
    """Per-sample dW, (B, *weight.shape) in weight's dtype; with want_norms also the float64
    squared norm of each sample's dW. Geometry as aten.convolution (output_padding only
    shapes grad_out, which is given). split <= 0: chosen by choose_tiles."""
    dw, norms = per_sample_conv_weight_grad_op(
        grad_out, x, list(weight.shape), list(stride), list(padding), list(dilation),
        bool(transposed), int(groups), int(split), bool(want_norms),
    )  # fmt: skip
    dw = dw.to(weight.dtype)
    return (dw, norms) if want_norms else dw


def per_sample_conv_weight_grad_reference(
    grad_out, x, weight, stride, padding, dilation, transposed, output_padding, groups
) -> torch.Tensor:
    """ATen's own weight gradient, one sample at a time."""
    out = []
    for b in range(x.shape[0]):
        out.append(
            torch.ops.aten.convolution_backward(
                grad_out[b : b + 1], x[b : b + 1], weight, None, list(stride), list(padding),
                list(dilation), transposed, list(output_padding), groups, [False, True, False],
            )[1]
        )  # fmt: skip
    return torch.stack(out) if out else weight.new_zeros((0, *weight.shape))
