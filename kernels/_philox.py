"""Philox4x32-10 and its Gaussian as Triton device functions: the mirror of csrc/philox.h.

Every backend must draw the same bits (tests/test_kernels_ops.py holds this one to the
PyTorch mirror, dpseg/ops/philox.py, with torch.equal), so these functions perform the same
IEEE operations in the same order as the C++ header:
- ln and cos, sin of 2 pi u are series of + - * / on float64 with the header's hex coefficients
  (no libdevice log/cos: its last bits differ from libm's);
- every launch passes ``enable_fp_fusion=False`` (``NO_FMA`` below), or the compiler would
  contract ``q * z + c`` into an FMA and round once instead of twice;
- float64 ``/`` lowers to div.rn.f64 and float64 ``tl.sqrt`` to sqrt.rn.f64 (the "fast"
  approximations exist for float32 only), both correctly rounded, as is numpy's sqrt that
  the interpreter runs. (torch.sqrt on CPU is not, hence ``sqrt_rn`` in the mirror.)
Python float constants below are ``tl.constexpr`` and meet float64 tensors only, so Triton
materialises them as float64 constants (exact) rather than through float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dpseg.ops import philox as _P

# Launch options every noise kernel needs: no multiply-add contraction.
NO_FMA = {"enable_fp_fusion": False}

_LN0: tl.constexpr = tl.constexpr(_P.LN_COEFFS[0])
_LN1: tl.constexpr = tl.constexpr(_P.LN_COEFFS[1])
_LN2: tl.constexpr = tl.constexpr(_P.LN_COEFFS[2])
_LN3: tl.constexpr = tl.constexpr(_P.LN_COEFFS[3])
_LN4: tl.constexpr = tl.constexpr(_P.LN_COEFFS[4])
_LN5: tl.constexpr = tl.constexpr(_P.LN_COEFFS[5])
_LN6: tl.constexpr = tl.constexpr(_P.LN_COEFFS[6])
_LN7: tl.constexpr = tl.constexpr(_P.LN_COEFFS[7])
_LN8: tl.constexpr = tl.constexpr(_P.LN_COEFFS[8])
_C0: tl.constexpr = tl.constexpr(_P.COS_COEFFS[0])
_C1: tl.constexpr = tl.constexpr(_P.COS_COEFFS[1])
_C2: tl.constexpr = tl.constexpr(_P.COS_COEFFS[2])
_C3: tl.constexpr = tl.constexpr(_P.COS_COEFFS[3])
_C4: tl.constexpr = tl.constexpr(_P.COS_COEFFS[4])
_C5: tl.constexpr = tl.constexpr(_P.COS_COEFFS[5])
_C6: tl.constexpr = tl.constexpr(_P.COS_COEFFS[6])
_C7: tl.constexpr = tl.constexpr(_P.COS_COEFFS[7])
_S0: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[0])
_S1: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[1])
_S2: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[2])
_S3: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[3])
_S4: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[4])
_S5: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[5])
_S6: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[6])
_S7: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[7])
_LN2_HI: tl.constexpr = tl.constexpr(_P.LN2_HI)
_LN2_LO: tl.constexpr = tl.constexpr(_P.LN2_LO)
_SQRT_HALF: tl.constexpr = tl.constexpr(_P.SQRT_HALF)
_PI_OVER_2: tl.constexpr = tl.constexpr(_P.PI_OVER_2)
_TWO26: tl.constexpr = tl.constexpr(67108864.0)
_TWO_M53: tl.constexpr = tl.constexpr(2.0**-53)


def split_u64(value: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a uint64 given as a Python int (any sign)."""
    value &= (1 << 64) - 1
    return value & 0xFFFFFFFF, value >> 32


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten rounds on uint32 words; k0, k1 uint32 scalars. Same as dpseg::philox4x32_10."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def exact_ops_log(x):
    """ln of positive normal float64 values, as dpseg::exact_ops_log."""
    bits = x.to(tl.int64, bitcast=True)
    e = ((bits >> 52) & 0x7FF) - 1022
    m = ((bits & 0x000FFFFFFFFFFFFF) | 0x3FE0000000000000).to(tl.float64, bitcast=True)
    small = m < _SQRT_HALF
    m = tl.where(small, m * 2.0, m)
    e = tl.where(small, e - 1, e)
    f = m - 1.0
    s = f / (f + 2.0)
    z = s * s
    q = z * _LN8 + _LN7
    q = q * z + _LN6
    q = q * z + _LN5
    q = q * z + _LN4
    q = q * z + _LN3
    q = q * z + _LN2
    q = q * z + _LN1
    q = q * z + _LN0
    ln_m = 2.0 * (s + s * (z * q))
    de = e.to(tl.float64)
    return de * _LN2_HI + (ln_m + de * _LN2_LO)


@triton.jit
def exact_ops_sincos_2pi(u):
    """(cos 2 pi u, sin 2 pi u) for float64 u in [0, 1), as dpseg::exact_ops_sincos_2pi."""
    v = u * 4.0
    k = v.to(tl.int32)  # truncation; v >= 0
    r = v - k.to(tl.float64)
    fold = r > 0.5
    r = tl.where(fold, r - 1.0, r)
    k = tl.where(fold, k + 1, k)
    t = r * _PI_OVER_2
    z = t * t
    pc = z * _C7 + _C6
    pc = pc * z + _C5
    pc = pc * z + _C4
    pc = pc * z + _C3
    pc = pc * z + _C2
    pc = pc * z + _C1
    pc = pc * z + _C0
    cos_t = 1.0 + z * pc
    ps = z * _S7 + _S6
    ps = ps * z + _S5
    ps = ps * z + _S4
    ps = ps * z + _S3
    ps = ps * z + _S2
    ps = ps * z + _S1
    ps = ps * z + _S0
    sin_t = t + t * (z * ps)
    # Quarter turn k = 0..4: cos = c, -s, -c, s, c and sin = s, c, -s, -c, s.
    odd = (k & 1) == 1
    cos_v = tl.where(odd, sin_t, cos_t)
    sin_v = tl.where(odd, cos_t, sin_t)
    cos_v = tl.where(((k + 1) & 2) != 0, -cos_v, cos_v)
    sin_v = tl.where((k & 2) != 0, -sin_v, sin_v)
    return cos_v, sin_v


@triton.jit
def philox_normal_pair(block, step_lo, step_hi, seed_lo, seed_hi):
    """The two standard normals (float64) of int64 Philox block indices; step/seed words are
    uint32. Same as dpseg::philox_normal_pair: radius times cos, radius times sin."""
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((block >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0 + step_lo
    c3 = c0 * 0 + step_hi
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
    n1 = (x0 >> 5).to(tl.float64) * _TWO26 + (x1 >> 6).to(tl.float64)
    n2 = (x2 >> 5).to(tl.float64) * _TWO26 + (x3 >> 6).to(tl.float64)
    u1 = (n1 + 0.5) * _TWO_M53
    u2 = n2 * _TWO_M53
    radius = tl.sqrt(-2.0 * exact_ops_log(u1))
    cos, sin = exact_ops_sincos_2pi(u2)
    return radius * cos, radius * sin


@triton.jit
def philox_normal(draw, step_lo, step_hi, seed_lo, seed_hi):
    """Normal ``draw`` (int64) of the stream: output draw & 1 of block draw >> 1."""
    n0, n1 = philox_normal_pair(draw >> 1, step_lo, step_hi, seed_lo, seed_hi)
    return tl.where((draw & 1) == 1, n1, n0)


@triton.jit
def philox_noise(e, step_lo, step_hi, seed_lo, seed_hi, root, DRAWS: tl.constexpr):
    """z of int64 element indices e, one element per lane: normals e * DRAWS .. e * DRAWS +
    DRAWS - 1 summed in order, over sqrt(DRAWS) when DRAWS > 1. With DRAWS even an element
    owns DRAWS / 2 whole blocks (secure mode: 2); DRAWS == 1 here spends a block per
    element, so kernels call philox_noise_run instead."""
    if DRAWS % 2 == 0:
        first = e * (DRAWS // 2)
        n0, n1 = philox_normal_pair(first, step_lo, step_hi, seed_lo, seed_hi)
        s = n0 + n1
        for k in tl.static_range(1, DRAWS // 2):
            n0, n1 = philox_normal_pair(first + k, step_lo, step_hi, seed_lo, seed_hi)
            s = s + n0
            s = s + n1
    else:
        first = e * DRAWS
        s = philox_normal(first, step_lo, step_hi, seed_lo, seed_hi)
        for k in tl.static_range(1, DRAWS):
            s = s + philox_normal(first + k, step_lo, step_hi, seed_lo, seed_hi)
    if DRAWS > 1:
        s = s / root
    return s


@triton.jit
def philox_noise_run(e0, step_lo, step_hi, seed_lo, seed_hi, root, DRAWS: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    """z of the BLOCK consecutive elements e0, e0 + 1, ... (e0 an int64 scalar, even when
    DRAWS == 1). DRAWS == 1: BLOCK / 2 lanes compute one block each and both outputs are
    interleaved into place (tl.join + tl.reshape, builtins: see _multi_tensor)."""
    if DRAWS == 1:
        q = (e0 >> 1) + tl.arange(0, BLOCK // 2).to(tl.int64)
        n0, n1 = philox_normal_pair(q, step_lo, step_hi, seed_lo, seed_hi)
        return tl.reshape(tl.join(n0, n1), [BLOCK])
    else:
        e = e0 + tl.arange(0, BLOCK).to(tl.int64)
        return philox_noise(e, step_lo, step_hi, seed_lo, seed_hi, root, DRAWS)


@triton.jit
def noise_keys(seed_lo, seed_hi, step_lo, step_hi):
    """The four scalar key/counter words as uint32 (kernel arguments arrive as int64)."""
    return (
        seed_lo.to(tl.uint32),
        seed_hi.to(tl.uint32),
        step_lo.to(tl.uint32),
        step_hi.to(tl.uint32),
    )
