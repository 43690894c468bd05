// The CPU noise generator behind every CPU op that draws noise: philox_noise_block (declared
// in philox.h), the same bits as philox.h's scalar philox_noise, many Philox blocks at a time.
// No torch headers, so a standalone C++ program can time or test it alone.
//
// A batch of blocks goes through four straight loops: Philox words, uniforms, sqrt(-2 ln u1),
// then cos and sin of the angle. The float loops use bit masks instead of branches or selects
// (AVX2 has no mask registers: GCC 12 leaves a `?:` of doubles as control flow and gives up
// on the loop) and exact bit tricks instead of int64 -> double conversions, so GCC vectorises
// them for every target. Vector + - * / sqrt are the same IEEE operations as scalar ones (and
// -ffp-contract=off forbids FMA), so the bits do not change: tests/test_ops_philox.py checks.
//
// Philox itself is written with AVX2 intrinsics where the CPU has AVX2: GCC vectorises the
// plain loop, but widens each 32 x 32 -> 64 product through shuffles (or emulates a 64-bit
// multiply); _mm256_mul_epu32 on 64-bit lanes does it in one instruction. Measured on the
// 2-core AMD EPYC (Zen 3) development VM, one thread, CPU time per normal: 9.5 ns with GCC's
// vectorisation of every stage (Philox 58% of it), 5.7 ns with the intrinsics.
// On a 2-core AMD EPYC with AVX-512 (Zen 4), 2 threads, bench/limits_cpu.py: 2.61 ns per
// normal with GCC's AVX-512 vectorisation of the generic Philox, 1.41 ns with the AVX-512
// intrinsics below (torch.randn: 3.41 ns).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"

// Function multiversioning on x86-64 GCC/Clang: one normal_pairs per target, chosen once by
// the loader. -DDPSEG_X86_VERSIONS=0 builds the portable path alone (tests/test_ops_philox.py
// checks both against the scalar header).
#ifndef DPSEG_X86_VERSIONS
#if defined(__GNUC__) && defined(__x86_64__)
#define DPSEG_X86_VERSIONS 1
#else
#define DPSEG_X86_VERSIONS 0
#endif
#endif
#if DPSEG_X86_VERSIONS
#include <immintrin.h>
#define DPSEG_TARGET(t) __attribute__((target(t)))
#endif
#if defined(__GNUC__)
#define DPSEG_INLINE inline __attribute__((always_inline))
#else
#define DPSEG_INLINE inline
#endif

namespace dpseg {
namespace cpu {
namespace {

// 128 blocks per batch: the batch's eight 1 KiB arrays stay in L1 beside the caller's.
constexpr int64_t kPairs = 128;

inline double bits_to_double(uint64_t b) {
  double d;
  std::memcpy(&d, &b, sizeof(d));
  return d;
}
inline uint64_t double_to_bits(double d) {
  uint64_t b;
  std::memcpy(&b, &d, sizeof(b));
  return b;
}
// Exact uint -> double for v < 2^52: 2^52 + v has v in its mantissa.
constexpr uint64_t kTwo52Bits = 0x4330000000000000ull;
constexpr double kTwo52 = 4503599627370496.0;
inline double small_uint_to_double(uint64_t v) { return bits_to_double(kTwo52Bits | v) - kTwo52; }
constexpr uint64_t kOneBits = 0x3FF0000000000000ull;  // 1.0
constexpr uint64_t kLow32 = 0xFFFFFFFFull;

// A batch's Box-Muller inputs: u1 in (0, 1], and the angle u2 as its quarter turn
// trunc(4 u2) and remainder 4 u2 - trunc(4 u2), both exact.
struct Uniforms {
  double u1[kPairs], rem[kPairs];
  uint64_t quarter[kPairs];
};

// From a block's words x0..x3 (32-bit values): u1 = ((x0 >> 5) 2^26 + (x1 >> 6) + 1/2) 2^-53
// as philox_normal_pair rounds it; n2 = (x2 >> 5) 2^26 + (x3 >> 6) is 2^53 u2, so 4 u2 =
// n2 2^-51, trunc(4 u2) = x2 >> 30 and 4 u2 - trunc(4 u2) = (n2 mod 2^51) 2^-51: the values
// exact_ops_sincos_2pi computes (exactly) from u2 in double.
DPSEG_INLINE void set_uniforms(Uniforms& u, int64_t i, uint64_t x0, uint64_t x1, uint64_t x2,
                               uint64_t x3) {
  const double n1 = small_uint_to_double(x0 >> 5) * 67108864.0 + small_uint_to_double(x1 >> 6);
  u.u1[i] = (n1 + 0.5) * 0x1p-53;
  u.quarter[i] = x2 >> 30;
  u.rem[i] = (small_uint_to_double((x2 >> 5) & 0x1FFFFFFu) * 67108864.0 +
              small_uint_to_double(x3 >> 6)) *
             0x1p-51;
}

// Blocks q0 + i for from <= i < nq, portable C (vectorised by GCC as it can).
DPSEG_INLINE void philox_uniforms_generic(uint64_t seed, uint64_t step, uint64_t q0, int64_t from,
                                          int64_t nq, Uniforms& u) {
  uint32_t k0[10], k1[10];
  k0[0] = static_cast<uint32_t>(seed);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int r = 1; r < 10; ++r) {
    k0[r] = k0[r - 1] + kPhiloxW0;
    k1[r] = k1[r - 1] + kPhiloxW1;
  }
  const uint32_t s0 = static_cast<uint32_t>(step), s1 = static_cast<uint32_t>(step >> 32);
  for (int64_t i = from; i < nq; ++i) {
    const uint64_t q = q0 + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = s0, c3 = s1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0[r];
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1[r];
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
    }
    set_uniforms(u, i, c0, c1, c2, c3);
  }
}

#if DPSEG_X86_VERSIONS
// set_uniforms on four blocks, one per 64-bit lane (the same operations in the same order).
DPSEG_TARGET("avx2")
inline void set_uniforms_avx2(Uniforms& u, int64_t i, __m256i x0, __m256i x1, __m256i x2,
                              __m256i x3) {
  const __m256i two52_bits = _mm256_set1_epi64x(kTwo52Bits);
  const __m256d two52 = _mm256_set1_pd(kTwo52), two26 = _mm256_set1_pd(67108864.0);
  const auto to_double = [&](__m256i v) DPSEG_TARGET("avx2") {
    return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(v, two52_bits)), two52);
  };
  const __m256d n1 = _mm256_add_pd(_mm256_mul_pd(to_double(_mm256_srli_epi64(x0, 5)), two26),
                                   to_double(_mm256_srli_epi64(x1, 6)));
  _mm256_storeu_pd(&u.u1[i], _mm256_mul_pd(_mm256_add_pd(n1, _mm256_set1_pd(0.5)),
                                           _mm256_set1_pd(0x1p-53)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(&u.quarter[i]), _mm256_srli_epi64(x2, 30));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi64(x2, 5), _mm256_set1_epi64x(0x1FFFFFF));
  const __m256d n2 = _mm256_add_pd(_mm256_mul_pd(to_double(hi), two26),
                                   to_double(_mm256_srli_epi64(x3, 6)));
  _mm256_storeu_pd(&u.rem[i], _mm256_mul_pd(n2, _mm256_set1_pd(0x1p-51)));
}

// Eight blocks per iteration in two independent vectors of four, one block per 64-bit lane
// holding a 32-bit word in its low half. _mm256_mul_epu32 multiplies the low halves into the
// full 64-bit product, so the high halves of c1, c3 (last round's products) may hold garbage:
// only low halves feed the products and the XORs that matter, and the words are masked
// before use. A round is a chain of multiply, shift and two XORs (about 6 cycles); the second
// vector fills that latency. Measured on Zen 3, one thread: 2.7 ns a block, against 4.1 ns
// with one vector and 11 ns for GCC's vectorisation of the generic loop.
DPSEG_TARGET("avx2")
void philox_uniforms_avx2(uint64_t seed, uint64_t step, uint64_t q0, int64_t nq, Uniforms& u) {
  __m256i k0[10], k1[10];
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, a += kPhiloxW0, b += kPhiloxW1) {
    k0[r] = _mm256_set1_epi64x(a);
    k1[r] = _mm256_set1_epi64x(b);
  }
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i low = _mm256_set1_epi64x(kLow32);
  const __m256i s0 = _mm256_set1_epi64x(step & kLow32), s1 = _mm256_set1_epi64x(step >> 32);
  const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0), four = _mm256_set1_epi64x(4);
  int64_t i = 0;
  for (; i + 8 <= nq; i += 8) {
    const __m256i qa = _mm256_add_epi64(_mm256_set1_epi64x(q0 + static_cast<uint64_t>(i)), lane);
    const __m256i qb = _mm256_add_epi64(qa, four);
    __m256i a0 = _mm256_and_si256(qa, low), a1 = _mm256_srli_epi64(qa, 32), a2 = s0, a3 = s1;
    __m256i b0 = _mm256_and_si256(qb, low), b1 = _mm256_srli_epi64(qb, 32), b2 = s0, b3 = s1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const __m256i pa0 = _mm256_mul_epu32(a0, m0), pb0 = _mm256_mul_epu32(b0, m0);
      const __m256i pa1 = _mm256_mul_epu32(a2, m1), pb1 = _mm256_mul_epu32(b2, m1);
      a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa1, 32), a1), k0[r]);
      b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb1, 32), b1), k0[r]);
      a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa0, 32), a3), k1[r]);
      b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb0, 32), b3), k1[r]);
      a1 = pa1;
      b1 = pb1;
      a3 = pa0;
      b3 = pb0;
    }
    set_uniforms_avx2(u, i, _mm256_and_si256(a0, low), _mm256_and_si256(a1, low),
                      _mm256_and_si256(a2, low), _mm256_and_si256(a3, low));
    set_uniforms_avx2(u, i + 4, _mm256_and_si256(b0, low), _mm256_and_si256(b1, low),
                      _mm256_and_si256(b2, low), _mm256_and_si256(b3, low));
  }
  philox_uniforms_generic(seed, step, q0, i, nq, u);  // the last nq % 8 blocks
}

#if !defined(DPSEG_NO_AVX512)  // -DDPSEG_NO_AVX512: AVX2 at best (tests check it on AVX-512 CPUs)
// The same on AVX-512: eight blocks a vector, two vectors per iteration (16 blocks), every
// instruction AVX512F. GCC's vectorisation of the generic loop emulates the 64-bit multiply
// (vpmullq is AVX512DQ) where _mm512_mul_epu32 needs one instruction, as on AVX2.
DPSEG_TARGET("avx512f")
inline void set_uniforms_avx512(Uniforms& u, int64_t i, __m512i x0, __m512i x1, __m512i x2,
                                __m512i x3) {
  const __m512i two52_bits = _mm512_set1_epi64(kTwo52Bits);
  const __m512d two52 = _mm512_set1_pd(kTwo52), two26 = _mm512_set1_pd(67108864.0);
  const auto to_double = [&](__m512i v) DPSEG_TARGET("avx512f") {
    return _mm512_sub_pd(_mm512_castsi512_pd(_mm512_or_si512(v, two52_bits)), two52);
  };
  const __m512d n1 = _mm512_add_pd(_mm512_mul_pd(to_double(_mm512_srli_epi64(x0, 5)), two26),
                                   to_double(_mm512_srli_epi64(x1, 6)));
  _mm512_storeu_pd(&u.u1[i], _mm512_mul_pd(_mm512_add_pd(n1, _mm512_set1_pd(0.5)),
                                           _mm512_set1_pd(0x1p-53)));
  _mm512_storeu_si512(&u.quarter[i], _mm512_srli_epi64(x2, 30));
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi64(x2, 5), _mm512_set1_epi64(0x1FFFFFF));
  const __m512d n2 = _mm512_add_pd(_mm512_mul_pd(to_double(hi), two26),
                                   to_double(_mm512_srli_epi64(x3, 6)));
  _mm512_storeu_pd(&u.rem[i], _mm512_mul_pd(n2, _mm512_set1_pd(0x1p-51)));
}

DPSEG_TARGET("avx512f")
void philox_uniforms_avx512(uint64_t seed, uint64_t step, uint64_t q0, int64_t nq, Uniforms& u) {
  __m512i k0[10], k1[10];
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r, a += kPhiloxW0, b += kPhiloxW1) {
    k0[r] = _mm512_set1_epi64(a);
    k1[r] = _mm512_set1_epi64(b);
  }
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i low = _mm512_set1_epi64(kLow32);
  const __m512i s0 = _mm512_set1_epi64(step & kLow32), s1 = _mm512_set1_epi64(step >> 32);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), eight = _mm512_set1_epi64(8);
  int64_t i = 0;
  for (; i + 16 <= nq; i += 16) {
    const __m512i qa = _mm512_add_epi64(_mm512_set1_epi64(q0 + static_cast<uint64_t>(i)), lane);
    const __m512i qb = _mm512_add_epi64(qa, eight);
    __m512i a0 = _mm512_and_si512(qa, low), a1 = _mm512_srli_epi64(qa, 32), a2 = s0, a3 = s1;
    __m512i b0 = _mm512_and_si512(qb, low), b1 = _mm512_srli_epi64(qb, 32), b2 = s0, b3 = s1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const __m512i pa0 = _mm512_mul_epu32(a0, m0), pb0 = _mm512_mul_epu32(b0, m0);
      const __m512i pa1 = _mm512_mul_epu32(a2, m1), pb1 = _mm512_mul_epu32(b2, m1);
      a0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pa1, 32), a1), k0[r]);
      b0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pb1, 32), b1), k0[r]);
      a2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pa0, 32), a3), k1[r]);
      b2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pb0, 32), b3), k1[r]);
      a1 = pa1;
      b1 = pb1;
      a3 = pa0;
      b3 = pb0;
    }
    set_uniforms_avx512(u, i, _mm512_and_si512(a0, low), _mm512_and_si512(a1, low),
                        _mm512_and_si512(a2, low), _mm512_and_si512(a3, low));
    set_uniforms_avx512(u, i + 8, _mm512_and_si512(b0, low), _mm512_and_si512(b1, low),
                        _mm512_and_si512(b2, low), _mm512_and_si512(b3, low));
  }
  philox_uniforms_generic(seed, step, q0, i, nq, u);  // the last nq % 16 blocks
}
#endif  // DPSEG_NO_AVX512
#endif

// out[2i], out[2i + 1] = the pair of the block whose uniforms are u's i-th, i < nq.
DPSEG_INLINE void pairs_from_uniforms(const Uniforms& u, int64_t nq, double* __restrict__ out) {
  const double* u1 = u.u1;
  const double* rem = u.rem;
  const uint64_t* quarter = u.quarter;
  double rad[kPairs];
  // sqrt(-2 ln u1), ln as exact_ops_log (u1 is normal: its exponent field is never 0).
  for (int64_t i = 0; i < nq; ++i) {
    const uint64_t bits = double_to_bits(u1[i]);
    const uint64_t mant = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FE0000000000000ull;  // [0.5, 1)
    const uint64_t small = bits_to_double(mant) < kSqrtHalf;
    const double m = bits_to_double(mant + (small << 52));  // times 2 when small: exact
    const double e = small_uint_to_double((bits >> 52) - small) - 1022.0;
    const double f = m - 1.0;
    const double s = f / (f + 2.0);
    const double z = s * s;
    double q = kLnC[8];
#pragma GCC unroll 8
    for (int k = 7; k >= 0; --k) q = q * z + kLnC[k];
    const double ln_m = 2.0 * (s + s * (z * q));
    // sqrt vectorises only without errno: setup.py builds with -fno-math-errno.
    rad[i] = sqrt(-2.0 * (e * kLn2Hi + (ln_m + e * kLn2Lo)));
  }
  // cos and sin of 2 pi u2, as exact_ops_sincos_2pi: both series, then the quarter turn's
  // swap and signs as bit operations.
  for (int64_t i = 0; i < nq; ++i) {
    const uint64_t fold = rem[i] > 0.5;
    const double r = rem[i] - bits_to_double((0 - fold) & kOneBits);  // r - 1 or r - 0
    const uint64_t k = quarter[i] + fold;
    const double t = r * kPiOver2;
    const double z = t * t;
    double pc = kCosC[7], ps = kSinC[7];
#pragma GCC unroll 7
    for (int n = 6; n >= 0; --n) {
      pc = pc * z + kCosC[n];
      ps = ps * z + kSinC[n];
    }
    const uint64_t cb = double_to_bits(1.0 + z * pc), sb = double_to_bits(t + t * (z * ps));
    const uint64_t odd = 0 - (k & 1);  // all ones for quarter turns 1, 3: cos and sin swap
    const uint64_t cos_bits = ((cb & ~odd) | (sb & odd)) ^ (((k + 1) & 2) << 62);
    const uint64_t sin_bits = ((sb & ~odd) | (cb & odd)) ^ ((k & 2) << 62);
    out[2 * i] = rad[i] * bits_to_double(cos_bits);
    out[2 * i + 1] = rad[i] * bits_to_double(sin_bits);
  }
}

// out[2i], out[2i + 1] = philox_normal_pair(seed, step, q0 + i), i < nq <= kPairs.
#if DPSEG_X86_VERSIONS
DPSEG_TARGET("default")
void normal_pairs(uint64_t seed, uint64_t step, uint64_t q0, int64_t nq, double* out) {
  Uniforms u;
  philox_uniforms_generic(seed, step, q0, 0, nq, u);
  pairs_from_uniforms(u, nq, out);
}
DPSEG_TARGET("avx2")
void normal_pairs(uint64_t seed, uint64_t step, uint64_t q0, int64_t nq, double* out) {
  Uniforms u;
  philox_uniforms_avx2(seed, step, q0, nq, u);
  pairs_from_uniforms(u, nq, out);
}
#if !defined(DPSEG_NO_AVX512)
// AVX-512: Philox with intrinsics as above, the float loops vectorised by GCC with mask
// registers.
DPSEG_TARGET("avx512f")
void normal_pairs(uint64_t seed, uint64_t step, uint64_t q0, int64_t nq, double* out) {
  Uniforms u;
  philox_uniforms_avx512(seed, step, q0, nq, u);
  pairs_from_uniforms(u, nq, out);
}
#endif
#else
void normal_pairs(uint64_t seed, uint64_t step, uint64_t q0, int64_t nq, double* out) {
  Uniforms u;
  philox_uniforms_generic(seed, step, q0, 0, nq, u);
  pairs_from_uniforms(u, nq, out);
}
#endif

// out[j] = philox_normal(seed, step, d0 + j), j < n: whole blocks, both outputs used (one
// spare output at each end of an odd-aligned range).
void normals(uint64_t seed, uint64_t step, uint64_t d0, int64_t n, double* out) {
  double pairs[2 * kPairs];
  for (int64_t j = 0; j < n;) {
    const uint64_t d = d0 + static_cast<uint64_t>(j);
    const int64_t skip = static_cast<int64_t>(d & 1);
    const int64_t take = std::min(2 * kPairs - skip, n - j);
    const int64_t nq = (skip + take + 1) >> 1;
    if (skip == 0 && take == 2 * nq) {
      normal_pairs(seed, step, d >> 1, nq, out + j);
    } else {
      normal_pairs(seed, step, d >> 1, nq, pairs);
      std::memcpy(out + j, pairs + skip, static_cast<size_t>(take) * sizeof(double));
    }
    j += take;
  }
}

}  // namespace

void philox_noise_block(uint64_t seed, uint64_t step, uint64_t e0, int64_t n, int64_t draws,
                        double* out) {
  if (draws == 1) {  // the noise is the normal itself: no sum, no division
    normals(seed, step, e0, n, out);
    return;
  }
  const double root = std::sqrt(static_cast<double>(draws));
  constexpr int64_t kNormals = 2 * kPairs;
  if (draws > kNormals) {  // not a real use; keep it simple
    for (int64_t j = 0; j < n; ++j) out[j] = philox_noise(seed, step, e0 + j, draws, root);
    return;
  }
  double buf[kNormals];
  const int64_t per = kNormals / draws;  // elements per batch of normals
  for (int64_t j = 0; j < n; j += per) {
    const int64_t m = std::min(per, n - j);
    normals(seed, step, (e0 + j) * static_cast<uint64_t>(draws), m * draws, buf);
    for (int64_t i = 0; i < m; ++i) {
      double s = buf[i * draws];
      for (int64_t k = 1; k < draws; ++k) s = s + buf[i * draws + k];
      out[j + i] = s / root;
    }
  }
}

}  // namespace cpu
}  // namespace dpseg
