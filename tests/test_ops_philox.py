"""Philox4x32-10 and its Gaussian: known answers, accuracy of the exact-ops math, and the
C++ kernel equal to the PyTorch mirror bit for bit."""

import math
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import mpmath
import pytest
import torch

from dpseg.ops import BACKENDS, gaussian_noise
from dpseg.ops import philox as P

needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="dpseg C++ extension not built")

# Random123's kat_vectors for philox4x32_10: (counter, key, expected output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def test_philox_known_answers_torch():
    for counter, key, expected in KAT:
        words = P.philox4x32_10(tuple(torch.tensor([w]) for w in counter), key)
        assert tuple(int(w) for w in words) == expected


@needs_cpp
def test_philox_known_answers_cpp():
    from dpseg.ops import _ext

    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    assert _ext.philox4x32_10(counter, key).tolist() == [list(e) for _, _, e in KAT]


def test_series_constants_are_the_rationals_rounded():
    assert P.LN_COEFFS == tuple(float(Fraction(1, 2 * k + 1)) for k in range(1, 10))
    fact = math.factorial
    assert P.COS_COEFFS == tuple(float(Fraction((-1) ** n, fact(2 * n))) for n in range(1, 9))
    assert P.SIN_COEFFS == tuple(float(Fraction((-1) ** n, fact(2 * n + 1))) for n in range(1, 9))
    mpmath.mp.prec = 200
    assert P.LN2_HI + P.LN2_LO == float(mpmath.log(2))
    assert P.PI_OVER_2 == float(mpmath.pi / 2) and P.SQRT_HALF == float(mpmath.sqrt(0.5))


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.full_like(x, math.inf)) - x.abs()


def test_log_matches_libm():
    g = torch.Generator().manual_seed(1)
    mant = torch.rand(200_000, dtype=torch.float64, generator=g) * 0.5 + 0.5
    u = torch.ldexp(mant, -torch.randint(0, 56, (200_000,), generator=g))
    edges = [2.0**-54, 2.0**-53, 3 * 2.0**-54, 0.5, P.SQRT_HALF, 1 - 2.0**-53, 1.0, 0.999, 0.7]
    edges += [math.nextafter(P.SQRT_HALF, 0), math.nextafter(P.SQRT_HALF, 1)]
    u = torch.cat([u, torch.tensor(edges, dtype=torch.float64)])
    got = P.exact_ops_log(u)
    want = torch.tensor([math.log(x) for x in u.tolist()], dtype=torch.float64)
    err = (got - want).abs()
    assert err.max() < 1e-14
    assert (err <= 2 * _ulp(want)).all()  # measured: at most 1.4 ulp
    assert P.exact_ops_log(torch.tensor([1.0], dtype=torch.float64)).item() == 0.0


def test_cos_2pi_matches_mpmath_and_libm():
    g = torch.Generator().manual_seed(2)
    u = torch.randint(0, 2**53, (100_000,), generator=g).double() * 2.0**-53
    near = [k / 8 + d * 2.0**-53 for k in range(9) for d in (-3, -1, 0, 1, 3)]
    u = torch.cat([u, torch.tensor([x for x in near if 0 <= x < 1], dtype=torch.float64)])
    got = P.exact_ops_cos_2pi(u)
    # libm sees 2*pi*u rounded first, so it is itself ~1e-15 off near the zeros.
    libm = torch.tensor([math.cos(2 * math.pi * x) for x in u.tolist()], dtype=torch.float64)
    assert (got - libm).abs().max() < 2e-15
    mpmath.mp.prec = 120
    pick = torch.cat([u[:2000], u[100_000:]])
    exact = [float(mpmath.cospi(2 * mpmath.mpf(x))) for x in pick.tolist()]
    exact = torch.tensor(exact, dtype=torch.float64)
    assert ((P.exact_ops_cos_2pi(pick) - exact).abs() <= _ulp(exact)).all()


def test_sin_2pi_matches_mpmath_and_libm():
    g = torch.Generator().manual_seed(4)
    u = torch.randint(0, 2**53, (100_000,), generator=g).double() * 2.0**-53
    near = [k / 8 + d * 2.0**-53 for k in range(9) for d in (-3, -1, 0, 1, 3)]
    u = torch.cat([u, torch.tensor([x for x in near if 0 <= x < 1], dtype=torch.float64)])
    cos, sin = P.exact_ops_sincos_2pi(u)
    assert torch.equal(cos, P.exact_ops_cos_2pi(u))
    libm = torch.tensor([math.sin(2 * math.pi * x) for x in u.tolist()], dtype=torch.float64)
    assert (sin - libm).abs().max() < 2e-15
    mpmath.mp.prec = 120
    pick = torch.cat([u[:2000], u[100_000:]])
    exact = [float(mpmath.sinpi(2 * mpmath.mpf(x))) for x in pick.tolist()]
    exact = torch.tensor(exact, dtype=torch.float64)
    # Measured on 20,000 random u: at most 2 ulps (of |x| rounded up) for sin and for cos.
    assert ((P.exact_ops_sincos_2pi(pick)[1] - exact).abs() <= 2 * _ulp(exact)).all()


def test_sqrt_rn_is_correctly_rounded():
    g = torch.Generator().manual_seed(3)
    y = torch.rand(100_000, dtype=torch.float64, generator=g) * 80
    y = torch.cat([y, torch.ldexp(y[:1000], -torch.randint(0, 200, (1000,), generator=g))])
    y = torch.cat([y, torch.tensor([4.0, 2.0, 0.25, 2.0**-53, math.nextafter(4.0, 0), 75.0])])
    want = torch.tensor([math.sqrt(v) for v in y.tolist()], dtype=torch.float64)
    assert torch.equal(P.sqrt_rn(y), want)
    zeros = P.sqrt_rn(torch.tensor([0.0, -0.0], dtype=torch.float64))
    assert zeros.tolist() == [0.0, 0.0] and math.copysign(1, zeros[1].item()) == -1


def test_normal_follows_the_spec_from_philox_words():
    """Normal d is output d & 1 of block d >> 1: u1, u2 from the block's words as the contract
    states, then float64 libm's radius times cos (even d) or sin (odd d): within 1e-13."""
    draw = torch.arange(5000, dtype=torch.int64) * 7919 + 2**33
    seed, step = 0xDEADBEEF12345678, 2**35 + 3
    got = P.philox_normal(seed, step, draw)
    block = draw >> 1
    counter = (block & P.MASK32, block >> 32, torch.full_like(draw, 3), torch.full_like(draw, 8))
    x0, x1, x2, x3 = (w.tolist() for w in P.philox4x32_10(counter, (0x12345678, 0xDEADBEEF)))
    for i in range(0, 5000, 97):
        u1 = ((x0[i] >> 5) * 2**26 + (x1[i] >> 6) + 0.5) / 2**53
        u2 = ((x2[i] >> 5) * 2**26 + (x3[i] >> 6)) / 2**53
        angle = (math.sin if int(draw[i]) & 1 else math.cos)(2 * math.pi * u2)
        want = math.sqrt(-2 * math.log(u1)) * angle
        assert abs(got[i].item() - want) < 1e-13


def test_a_block_gives_two_normals_and_the_stream_uses_both():
    block = torch.arange(10, 2000, dtype=torch.int64) * 104729
    n0, n1 = P.philox_normal_pair(77, 5, block)
    assert torch.equal(P.philox_normal(77, 5, 2 * block), n0)
    assert torch.equal(P.philox_normal(77, 5, 2 * block + 1), n1)
    # Any range of the stream, either parity at either end.
    for first, count in [(0, 9), (1, 9), (4097, 1), (2**40 + 1, 6), (2**40, 7)]:
        d = torch.arange(first, first + count, dtype=torch.int64)
        assert torch.equal(P.philox_normals(count, 77, 5, first), P.philox_normal(77, 5, d))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "numel,seed,step,offset,draws",
    [
        (1, 0, 0, 0, 1),
        (7, 2**64 - 1, 5, 123, 1),
        (1000, 2**63, 2**40 + 7, 2**33, 1),
        (4097, 12345, 9, 1, 4),
        (333, 7, 3, 11, 3),
        (0, 1, 1, 0, 1),
    ],
)
def test_cpp_noise_equals_torch_bitwise(dtype, numel, seed, step, offset, draws):
    args = (numel, seed, step, offset, draws, dtype)
    cpp = gaussian_noise(*args, backend="cpp")
    ref = gaussian_noise(*args, backend="torch")
    assert cpp.dtype == dtype and cpp.shape == (numel,)
    assert torch.equal(cpp, ref)


@needs_cpp
def test_cpp_noise_equals_torch_bitwise_large():
    cpp = gaussian_noise(1_000_003, 42, 17, offset=999, dtype=torch.float64, backend="cpp")
    assert torch.equal(cpp, gaussian_noise(1_000_003, 42, 17, 999, dtype=torch.float64))


@pytest.mark.parametrize(
    "versions",
    [["-DDPSEG_X86_VERSIONS=1"], ["-DDPSEG_X86_VERSIONS=1", "-DDPSEG_NO_AVX512"],
     ["-DDPSEG_X86_VERSIONS=0"]],
    ids=["per-target", "avx2-at-best", "portable"],
)  # fmt: skip
def test_cpu_block_generator_equals_the_scalar_header(tmp_path, versions):
    """The vectorised CPU generator (the best of its AVX-512 or AVX2 intrinsics the CPU has,
    else GCC's vectorisation), the same without the AVX-512 version (so an AVX-512 CPU
    checks the AVX2 one too), and the portable path, each bitwise the scalar philox.h,
    compiled with setup.py's flags. The extension's own path is held to the torch mirror
    above."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "check"
    cmd = [cxx, "-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno",
           *versions, "-I", str(root / "csrc"),
           str(root / "tests" / "cpp" / "philox_block_check.cpp"),
           str(root / "csrc" / "cpu" / "philox_cpu.cpp"), "-o", str(exe)]  # fmt: skip
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout
