"""Philox4x32-10 and its Gaussian as Triton device functions: the mirror of csrc/philox.h.

Every backend must draw the same bits (tests/test_kernels_ops.py holds this one to the
PyTorch mirror, dpseg/ops/philox.py, with torch.equal), so these functions perform the same
IEEE operations in the same order as the C++ header:
- ln and cos(2 pi u) are series of + - * / on float64 with the header's hex coefficients
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
_LN9: tl.constexpr = tl.constexpr(_P.LN_COEFFS[9])
_LN10: tl.constexpr = tl.constexpr(_P.LN_COEFFS[10])
_C0: tl.constexpr = tl.constexpr(_P.COS_COEFFS[0])
_C1: tl.constexpr = tl.constexpr(_P.COS_COEFFS[1])
_C2: tl.constexpr = tl.constexpr(_P.COS_COEFFS[2])
_C3: tl.constexpr = tl.constexpr(_P.COS_COEFFS[3])
_C4: tl.constexpr = tl.constexpr(_P.COS_COEFFS[4])
_C5: tl.constexpr = tl.constexpr(_P.COS_COEFFS[5])
_C6: tl.constexpr = tl.constexpr(_P.COS_COEFFS[6])
_C7: tl.constexpr = tl.constexpr(_P.COS_COEFFS[7])
_C8: tl.constexpr = tl.constexpr(_P.COS_COEFFS[8])
_S0: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[0])
_S1: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[1])
_S2: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[2])
_S3: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[3])
_S4: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[4])
_S5: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[5])
_S6: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[6])
_S7: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[7])
_S8: tl.constexpr = tl.constexpr(_P.SIN_COEFFS[8])
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
    q = z * _LN10 + _LN9
    q = q * z + _LN8
    q = q * z + _LN7
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
def exact_ops_cos_2pi(u):
    """cos(2 pi u) for float64 u in [0, 1), as dpseg::exact_ops_cos_2pi."""
    v = u * 4.0
    k = v.to(tl.int32)  # truncation; v >= 0
    r = v - k.to(tl.float64)
    fold = r > 0.5
    r = tl.where(fold, r - 1.0, r)
    k = tl.where(fold, k + 1, k)
    t = r * _PI_OVER_2
    z = t * t
    pc = z * _C8 + _C7
    pc = pc * z + _C6
    pc = pc * z + _C5
    pc = pc * z + _C4
    pc = pc * z + _C3
    pc = pc * z + _C2
    pc = pc * z + _C1
    pc = pc * z + _C0
    cos_t = 1.0 + z * pc
    ps = z * _S8 + _S7
    ps = ps * z + _S6
    ps = ps * z + _S5
    ps = ps * z + _S4
    ps = ps * z + _S3
    ps = ps * z + _S2
    ps = ps * z + _S1
    ps = ps * z + _S0
    sin_t = t + t * (z * ps)
    even = (k & 1) == 0
    val = tl.where(even, cos_t, sin_t)
    neg = tl.where(even, (k & 2) != 0, (k & 2) == 0)
    return tl.where(neg, -val, val)


@triton.jit
def philox_normal(draw, step_lo, step_hi, seed_lo, seed_hi):
    """Standard normals (float64) for int64 draw indices; step/seed words are uint32."""
    c0 = (draw & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((draw >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0 + step_lo
    c3 = c0 * 0 + step_hi
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
    n1 = (x0 >> 5).to(tl.float64) * _TWO26 + (x1 >> 6).to(tl.float64)
    n2 = (x2 >> 5).to(tl.float64) * _TWO26 + (x3 >> 6).to(tl.float64)
    u1 = (n1 + 0.5) * _TWO_M53
    u2 = n2 * _TWO_M53
    return tl.sqrt(-2.0 * exact_ops_log(u1)) * exact_ops_cos_2pi(u2)


@triton.jit
def philox_noise(e, step_lo, step_hi, seed_lo, seed_hi, root, DRAWS: tl.constexpr):
    """z of int64 element indices e: the mean of DRAWS normals times sqrt(DRAWS)."""
    first = e * DRAWS
    s = philox_normal(first, step_lo, step_hi, seed_lo, seed_hi)
    if DRAWS > 1:
        for k in tl.static_range(1, DRAWS):
            s = s + philox_normal(first + k, step_lo, step_hi, seed_lo, seed_hi)
        s = s / root
    return s


@triton.jit
def noise_keys(seed_lo, seed_hi, step_lo, step_hi):
    """The four scalar key/counter words as uint32 (kernel arguments arrive as int64)."""
    return (
        seed_lo.to(tl.uint32),
        seed_hi.to(tl.uint32),
        step_lo.to(tl.uint32),
        step_hi.to(tl.uint32),
    )
