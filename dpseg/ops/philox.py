"""Philox4x32-10 and its Gaussian in plain PyTorch: the mirror of csrc/philox.h.

Every function here runs vectorised over int64 / float64 tensors on any device, and performs
the same IEEE operations in the same order as the C++ header (each torch op rounds once), so
the noise is the same bits whatever backend draws it. Two rules keep it that way:
- no torch.log / torch.cos / torch.sin (SLEEF and libm differ in the last bits): ln and
  cos, sin of 2 pi u are series built from + - * /, frexp and comparisons only; even
  torch.sqrt is not correctly rounded on CPU, so sqrt_rn corrects it exactly;
- no fused ops (addcmul, lerp) and no division by a Python scalar that is not a power of two
  (CUDA turns those into a multiply by the reciprocal).
Philox words live in int64 tensors; 32 x 32 -> 64 products wrap in two's complement, which
keeps the low 64 bits exact, and the high word is recovered with a shift and a mask.

The stream: normal d of (seed, step) is output d & 1 of Philox block d >> 1 (Box-Muller's
cosine, then its sine); element e's noise sums normals e * draws .. e * draws + draws - 1.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85

_h = float.fromhex
# Same hex literals as csrc/philox.h; test_ops_philox checks them against exact rationals.
LN_COEFFS = tuple(map(_h, (
    "0x1.5555555555555p-2", "0x1.999999999999ap-3", "0x1.2492492492492p-3", "0x1.c71c71c71c71cp-4",
    "0x1.745d1745d1746p-4", "0x1.3b13b13b13b14p-4", "0x1.1111111111111p-4", "0x1.e1e1e1e1e1e1ep-5",
    "0x1.af286bca1af28p-5",
)))  # fmt: skip
COS_COEFFS = tuple(map(_h, (
    "-0x1.0000000000000p-1", "0x1.5555555555555p-5", "-0x1.6c16c16c16c17p-10",
    "0x1.a01a01a01a01ap-16", "-0x1.27e4fb7789f5cp-22", "0x1.1eed8eff8d898p-29",
    "-0x1.93974a8c07c9dp-37", "0x1.ae7f3e733b81fp-45",
)))  # fmt: skip
SIN_COEFFS = tuple(map(_h, (
    "-0x1.5555555555555p-3", "0x1.1111111111111p-7", "-0x1.a01a01a01a01ap-13",
    "0x1.71de3a556c734p-19", "-0x1.ae64567f544e4p-26", "0x1.6124613a86d09p-33",
    "-0x1.ae7f3e733b81fp-41", "0x1.952c77030ad4ap-49",
)))  # fmt: skip
LN2_HI = _h("0x1.62e42fee00000p-1")
LN2_LO = _h("0x1.a39ef35793c76p-33")
SQRT_HALF = _h("0x1.6a09e667f3bcdp-1")
PI_OVER_2 = _h("0x1.921fb54442d18p+0")


def philox4x32_10(
    counter: tuple[torch.Tensor, ...], key: tuple[int, int]
) -> tuple[torch.Tensor, ...]:
    """Ten Philox rounds on four int64 tensors of 32-bit words; key is two 32-bit ints."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        hi0, lo0 = (p0 >> 32) & MASK32, p0 & MASK32
        hi1, lo1 = (p1 >> 32) & MASK32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def exact_ops_log(x: torch.Tensor) -> torch.Tensor:
    """ln of positive normal float64 values, mirroring dpseg::exact_ops_log."""
    m, e = torch.frexp(x)
    small = m < SQRT_HALF
    m = torch.where(small, m * 2.0, m)
    e = torch.where(small, e - 1, e).to(torch.float64)
    f = m - 1.0
    s = f / (f + 2.0)
    z = s * s
    q = torch.full_like(z, LN_COEFFS[-1])
    for c in reversed(LN_COEFFS[:-1]):
        q = q * z + c
    ln_m = 2.0 * (s + s * (z * q))
    return e * LN2_HI + (ln_m + e * LN2_LO)


def exact_ops_sincos_2pi(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos 2 pi u, sin 2 pi u) for float64 u in [0, 1), mirroring dpseg::exact_ops_sincos_2pi."""
    v = u * 4.0
    k = torch.trunc(v)
    r = v - k
    fold = r > 0.5
    r = torch.where(fold, r - 1.0, r)
    k = torch.where(fold, k + 1.0, k).to(torch.int64)
    t = r * PI_OVER_2
    z = t * t
    pc = torch.full_like(z, COS_COEFFS[-1])
    ps = torch.full_like(z, SIN_COEFFS[-1])
    for cc, sc in zip(reversed(COS_COEFFS[:-1]), reversed(SIN_COEFFS[:-1]), strict=True):
        pc = pc * z + cc
        ps = ps * z + sc
    cos_t = 1.0 + z * pc
    sin_t = t + t * (z * ps)
    # Quarter turn k = 0..4: cos = c, -s, -c, s, c and sin = s, c, -s, -c, s.
    odd = (k & 1) == 1
    cos_v = torch.where(odd, sin_t, cos_t)
    sin_v = torch.where(odd, cos_t, sin_t)
    cos_v = torch.where(((k + 1) & 2) != 0, -cos_v, cos_v)
    sin_v = torch.where((k & 2) != 0, -sin_v, sin_v)
    return cos_v, sin_v


def exact_ops_cos_2pi(u: torch.Tensor) -> torch.Tensor:
    """cos(2 pi u) for float64 u in [0, 1), mirroring dpseg::exact_ops_cos_2pi."""
    return exact_ops_sincos_2pi(u)[0]


def _above_midpoint(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True where sqrt(y) > a + ulp(a)/2, decided exactly for a within a few ulps of sqrt(y).

    With q = ulp(a), every quantity below is an integer multiple of q^2 under 2^60: a^2 = p + e
    exactly (Dekker's product on a Veltkamp split), y - p is exact (Sterbenz), and
    y - (a + q/2)^2 = q^2 (K - A - 1/4) with K = (y - a^2)/q^2 and A = a/q integers, so the
    test is K - A >= 1, done in int64.
    """
    q = torch.nextafter(a, torch.full_like(a, float("inf"))) - a
    q2 = q * q
    c = a * 134217729.0  # 2^27 + 1
    ah = c - (c - a)
    al = a - ah
    p = a * a
    e = (((ah * ah - p) + ah * al) + al * ah) + al * al
    t = y - p
    k = (t / q2).to(torch.int64) - (e / q2).to(torch.int64) - (a / q).to(torch.int64)
    return k > 0


def sqrt_rn(y: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float64 sqrt (what C++ sqrt and CUDA __dsqrt_rn return).

    Valid for y == +-0 and 2^-900 <= y < 2^900 (q^2 above must stay normal); the Gaussian
    needs y = -2 ln u1 in [0, 75]. torch.sqrt on CPU (torch 2.13, AVX512) is one ulp off on
    about 1.3% of inputs, so its result moves to whichever neighbour is nearest the true root.
    """
    pos = y > 0
    y1 = torch.where(pos, y, 1.0)
    r = torch.sqrt(y1)
    lo = torch.nextafter(r, torch.zeros_like(r))
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    r = torch.where(_above_midpoint(r, y1), up, torch.where(_above_midpoint(lo, y1), r, lo))
    return torch.where(pos, r, y)  # sqrt(+-0) = +-0


def philox_normal_pair(
    seed: int, step: int, block: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two standard normals (float64) of int64 Philox block indices, mirroring
    dpseg::philox_normal_pair: Box-Muller's radius times the cosine and times the sine."""
    seed &= (1 << 64) - 1
    counter = (
        block & MASK32,
        (block >> 32) & MASK32,
        torch.full_like(block, step & MASK32),
        torch.full_like(block, (step >> 32) & MASK32),
    )
    x0, x1, x2, x3 = philox4x32_10(counter, (seed & MASK32, seed >> 32))
    two26 = 67108864.0
    n1 = (x0 >> 5).to(torch.float64) * two26 + (x1 >> 6).to(torch.float64)
    n2 = (x2 >> 5).to(torch.float64) * two26 + (x3 >> 6).to(torch.float64)
    u1 = (n1 + 0.5) * 2.0**-53
    u2 = n2 * 2.0**-53
    radius = sqrt_rn(-2.0 * exact_ops_log(u1))
    cos, sin = exact_ops_sincos_2pi(u2)
    return radius * cos, radius * sin


def philox_normal(seed: int, step: int, draw: torch.Tensor) -> torch.Tensor:
    """Normal ``draw`` of the stream (float64), mirroring dpseg::philox_normal: output
    draw & 1 of block draw >> 1."""
    n0, n1 = philox_normal_pair(seed, step, draw >> 1)
    return torch.where((draw & 1) == 1, n1, n0)


def philox_normals(count: int, seed: int, step: int, first: int = 0, device=None) -> torch.Tensor:
    """Normals first .. first + count - 1 of the stream (float64): each block computed once,
    both of its outputs used."""
    q0, q1 = first >> 1, (first + count + 1) >> 1  # blocks covering the range
    block = torch.arange(q0, q1, dtype=torch.int64, device=device)
    n0, n1 = philox_normal_pair(seed, step, block)
    skip = first & 1
    return torch.stack([n0, n1], dim=1).flatten()[skip : skip + count]


def philox_noise(
    numel: int, seed: int, step: int, offset: int = 0, draws: int = 1, device=None
) -> torch.Tensor:
    """z for elements offset .. offset + numel - 1 as float64, mirroring dpseg::philox_noise:
    normals e * draws .. e * draws + draws - 1 summed in order, over sqrt(draws)."""
    normals = philox_normals(numel * draws, seed, step, offset * draws, device).view(numel, draws)
    s = normals[:, 0]
    for k in range(1, draws):
        s = s + normals[:, k]
    if draws == 1:
        return s
    # A 0-dim tensor divisor, not a Python float: see the module docstring.
    root = torch.tensor(math.sqrt(draws), dtype=torch.float64, device=s.device)
    return s / root
