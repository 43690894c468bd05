// Counter-based Gaussian noise shared by every dpseg backend (CPU and CUDA; Triton mirrors it).
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) turns
// (key, counter) into four 32-bit words with no state, so the noise of an element is a pure
// function of (seed, step, element index): any backend, thread count or grouping of tensors
// draws the same numbers. dpseg/ops/philox.py mirrors this file operation for operation and
// the tests hold the two equal bit for bit.
//
// Why no std::log / std::cos / std::sin: libm, SLEEF and CUDA's libdevice differ in the last
// bits, so ln and cos, sin of 2*pi*u are built here from IEEE-exact operations only (+ - * /
// sqrt, exponent extraction, comparisons, truncation). Compile with -ffp-contract=off (nvcc:
// --fmad=false) so no fused multiply-add changes a rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DPSEG_HD __host__ __device__
#else
#define DPSEG_HD
#endif

namespace dpseg {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bumps: golden ratio, sqrt(3) - 1
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x[4];
};

// Ten rounds, the key bumped between rounds (nine bumps), as in Random123's philox4x32_R.
DPSEG_HD inline Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c.x[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c.x[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c = Philox4{{hi1 ^ c.x[1] ^ k0, lo1, hi0 ^ c.x[3] ^ k1, lo0}};
  }
  return c;
}

// Series coefficients, as hex literals so that C++, Python and CUDA read the same bits. The
// macros give the device functions local copies: CUDA code cannot read namespace-scope
// constexpr arrays.
// ln: 1/(2k+1) for the odd atanh series, k = 1..9: |s| <= 0.1716, so the first omitted term
// is below 2.4e-17 of the result (a fifth of an ulp). cos: (-1)^n/(2n)!, n = 1..8; sin:
// (-1)^n/(2n+1)!, n = 1..8: |theta| <= pi/4, so the first omitted terms are below 2e-18 and
// 1e-19. Longer series (11, 9 and 9 terms until issue 26) measured no more accurate (within 2
// ulps of libm / mpmath either way) and cost 4 more multiply-adds per Philox block.
#define DPSEG_LN_COEFFS \
  0x1.5555555555555p-2, 0x1.999999999999ap-3, 0x1.2492492492492p-3, \
  0x1.c71c71c71c71cp-4, 0x1.745d1745d1746p-4, 0x1.3b13b13b13b14p-4, \
  0x1.1111111111111p-4, 0x1.e1e1e1e1e1e1ep-5, 0x1.af286bca1af28p-5
constexpr double kLnC[9] = {DPSEG_LN_COEFFS};
#define DPSEG_COS_COEFFS \
  -0x1.0000000000000p-1, 0x1.5555555555555p-5, -0x1.6c16c16c16c17p-10, \
  0x1.a01a01a01a01ap-16, -0x1.27e4fb7789f5cp-22, 0x1.1eed8eff8d898p-29, \
  -0x1.93974a8c07c9dp-37, 0x1.ae7f3e733b81fp-45
constexpr double kCosC[8] = {DPSEG_COS_COEFFS};
#define DPSEG_SIN_COEFFS \
  -0x1.5555555555555p-3, 0x1.1111111111111p-7, -0x1.a01a01a01a01ap-13, \
  0x1.71de3a556c734p-19, -0x1.ae64567f544e4p-26, 0x1.6124613a86d09p-33, \
  -0x1.ae7f3e733b81fp-41, 0x1.952c77030ad4ap-49
constexpr double kSinC[8] = {DPSEG_SIN_COEFFS};
constexpr double kLn2Hi = 0x1.62e42fee00000p-1;  // 32 significant bits: e * kLn2Hi is exact
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kSqrtHalf = 0x1.6a09e667f3bcdp-1;
constexpr double kPiOver2 = 0x1.921fb54442d18p+0;

// Natural log of a positive normal double. x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s), s = (m - 1) / (m + 1). Error about 1 ulp.
DPSEG_HD inline double exact_ops_log(double x) {
  uint64_t bits;
  memcpy(&bits, &x, sizeof(bits));
  int e = static_cast<int>((bits >> 52) & 0x7ff) - 1022;  // frexp: m in [0.5, 1)
  bits = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FE0000000000000ull;
  double m;
  memcpy(&m, &bits, sizeof(m));
  if (m < kSqrtHalf) {
    m = m * 2.0;
    e = e - 1;
  }
  const double f = m - 1.0;  // exact (Sterbenz)
  const double s = f / (f + 2.0);
  const double z = s * s;
  constexpr double kLnC[9] = {DPSEG_LN_COEFFS};
  double q = kLnC[8];
  for (int k = 7; k >= 0; --k) q = q * z + kLnC[k];
  const double ln_m = 2.0 * (s + s * (z * q));
  const double de = static_cast<double>(e);
  return de * kLn2Hi + (ln_m + de * kLn2Lo);
}

// cos(2 pi u) and sin(2 pi u) for u in [0, 1) a multiple of 2^-53: one reduction, both series.
// The reduction to a quarter turn is exact: v = 4u, k = trunc(v), r = v - k (|r| <= 1/2
// after folding), theta = r * pi/2, and 2 pi u = k pi/2 + theta.
struct SinCos {
  double cos, sin;
};
DPSEG_HD inline SinCos exact_ops_sincos_2pi(double u) {
  const double v = u * 4.0;
  int k = static_cast<int>(v);
  double r = v - static_cast<double>(k);
  if (r > 0.5) {
    r = r - 1.0;
    k = k + 1;
  }
  const double t = r * kPiOver2;
  const double z = t * t;
  constexpr double kCosC[8] = {DPSEG_COS_COEFFS};
  constexpr double kSinC[8] = {DPSEG_SIN_COEFFS};
  double pc = kCosC[7], ps = kSinC[7];
  for (int n = 6; n >= 0; --n) {
    pc = pc * z + kCosC[n];
    ps = ps * z + kSinC[n];
  }
  const double c = 1.0 + z * pc;      // cos theta
  const double s = t + t * (z * ps);  // sin theta
  // Quarter turn k = 0..4: cos = c, -s, -c, s, c and sin = s, c, -s, -c, s.
  const double cos_v = (k & 1) ? s : c, sin_v = (k & 1) ? c : s;
  return SinCos{((k + 1) & 2) ? -cos_v : cos_v, (k & 2) ? -sin_v : sin_v};
}

DPSEG_HD inline double exact_ops_cos_2pi(double u) { return exact_ops_sincos_2pi(u).cos; }

// The noise stream: normal d of (seed, step) is output d & 1 of Philox block q = d >> 1, key =
// seed, counter = (q, step). A block's four words make two uniforms (27 + 26 bits each: an
// integer below 2^53, exact in double), and Box-Muller turns them into two independent
// standard normals, radius times cos and times sin of the same angle: half the Philox rounds,
// logarithms and square roots per normal of taking the cosine alone. u1 in (0, 1] so the log
// is finite; sqrt is correctly rounded (IEEE).
struct NormalPair {
  double n0, n1;
};
DPSEG_HD inline NormalPair philox_normal_pair(uint64_t seed, uint64_t step, uint64_t q) {
  Philox4 c{{static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32),
             static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)}};
  c = philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  // hi * 2^26 + lo is exact in double.
  const double n1 = static_cast<double>(c.x[0] >> 5) * 67108864.0 + static_cast<double>(c.x[1] >> 6);
  const double n2 = static_cast<double>(c.x[2] >> 5) * 67108864.0 + static_cast<double>(c.x[3] >> 6);
  const double u1 = (n1 + 0.5) * 0x1p-53;
  const double u2 = n2 * 0x1p-53;
  const double radius = sqrt(-2.0 * exact_ops_log(u1));
  const SinCos a = exact_ops_sincos_2pi(u2);
  return NormalPair{radius * a.cos, radius * a.sin};
}

DPSEG_HD inline double philox_normal(uint64_t seed, uint64_t step, uint64_t d) {
  const NormalPair p = philox_normal_pair(seed, step, d >> 1);
  return (d & 1) ? p.n1 : p.n0;
}

// The noise z of element e: normals e * draws .. e * draws + draws - 1 summed in that order,
// divided by root = sqrt(double(draws)) when draws > 1 (unit variance). draws = 4 is Opacus's
// secure mode (sum of four normals over 2); with draws even an element owns draws / 2 whole
// blocks, with draws = 1 two neighbouring elements share one.
DPSEG_HD inline double philox_noise(uint64_t seed, uint64_t step, uint64_t e, int64_t draws,
                                    double root) {
  const uint64_t first = e * static_cast<uint64_t>(draws);
  const uint64_t last = first + static_cast<uint64_t>(draws) - 1;
  double s = 0.0;
  for (uint64_t q = first >> 1; q <= (last >> 1); ++q) {
    const NormalPair p = philox_normal_pair(seed, step, q);
    if (2 * q >= first) s = (2 * q == first) ? p.n0 : s + p.n0;
    if (2 * q + 1 <= last) s = (2 * q + 1 == first) ? p.n1 : s + p.n1;
  }
  return draws == 1 ? s : s / root;
}

#if !defined(__CUDACC__)
namespace cpu {
// out[j] = philox_noise(seed, step, e0 + j, draws, sqrt(draws)) for 0 <= j < n, the same bits,
// computed many blocks at a time in SIMD-friendly loops. Defined in csrc/cpu/philox_cpu.cpp.
void philox_noise_block(uint64_t seed, uint64_t step, uint64_t e0, int64_t n, int64_t draws,
                        double* out);
}  // namespace cpu
#endif

}  // namespace dpseg
