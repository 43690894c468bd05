// CPU kernels for the pure noise ops: gaussian_noise_ and the raw Philox test op.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "philox.h"

namespace dpseg {
namespace cpu {
namespace {

// Each stage below is a straight loop over a batch of Philox blocks, with bit masks instead of
// branches or selects (AVX2 has no mask registers: GCC 12 leaves a `?:` of doubles as control
// flow and gives up on the loop) and exact bit tricks instead of int64 -> double conversions,
// so GCC vectorises every stage in each clone. Vector + - * / sqrt are the same IEEE
// operations as scalar ones (and -ffp-contract=off forbids FMA), so the bits do not change:
// tests/test_ops_philox.py checks it. 128 blocks per batch: the five 1 KiB arrays of a batch
// stay in L1 beside the caller's buffers.
constexpr int64_t kPairs = 128;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DPSEG_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DPSEG_CPU_CLONES
#endif

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

// out[2i], out[2i + 1] = philox_normal_pair(seed, step, q0 + i), i < nq <= kPairs.
DPSEG_CPU_CLONES void normal_pairs(uint64_t seed, uint64_t step, uint64_t q0, int64_t nq,
                                   double* __restrict__ out) {
  uint32_t k0[10], k1[10];
  k0[0] = static_cast<uint32_t>(seed);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int r = 1; r < 10; ++r) {
    k0[r] = k0[r - 1] + kPhiloxW0;
    k1[r] = k1[r - 1] + kPhiloxW1;
  }
  const uint32_t s0 = static_cast<uint32_t>(step), s1 = static_cast<uint32_t>(step >> 32);
  double u1[kPairs], rad[kPairs], rem[kPairs];
  uint64_t quarter[kPairs];
  for (int64_t i = 0; i < nq; ++i) {
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
    const double n1 = small_uint_to_double(c0 >> 5) * 67108864.0 + small_uint_to_double(c1 >> 6);
    u1[i] = (n1 + 0.5) * 0x1p-53;
    // The angle's quarter turn and remainder straight from n2 = (c2 >> 5) 2^26 + (c3 >> 6):
    // 4 u2 = n2 2^-51, so trunc(4 u2) = c2 >> 30 and 4 u2 - trunc(4 u2) = (n2 mod 2^51) 2^-51,
    // the values exact_ops_sincos_2pi computes (exactly) from u2 in double.
    quarter[i] = c2 >> 30;
    rem[i] = (small_uint_to_double((c2 >> 5) & 0x1FFFFFFu) * 67108864.0 +
              small_uint_to_double(c3 >> 6)) *
             0x1p-51;
  }
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
    double q = kLnC[10];
#pragma GCC unroll 10
    for (int k = 9; k >= 0; --k) q = q * z + kLnC[k];
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
    double pc = kCosC[8], ps = kSinC[8];
#pragma GCC unroll 8
    for (int n = 7; n >= 0; --n) {
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

namespace {

// 2048 normals (tens of microseconds) amortise the thread hand-off.
constexpr int64_t kNoiseGrain = 2048;

// n <= kNoiseGrain values of noise into out: float64 directly, float32 through a buffer.
void fill_noise(uint64_t seed, uint64_t step, uint64_t e0, int64_t n, int64_t draws, double* out) {
  dpseg::cpu::philox_noise_block(seed, step, e0, n, draws, out);
}
void fill_noise(uint64_t seed, uint64_t step, uint64_t e0, int64_t n, int64_t draws, float* out) {
  double z[kNoiseGrain];
  dpseg::cpu::philox_noise_block(seed, step, e0, n, draws, z);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(z[i]);
}

void gaussian_noise_cpu_(at::Tensor& out, int64_t seed, int64_t step, int64_t offset,
                         int64_t draws) {
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous(),
              "gaussian_noise_: out must be a contiguous 1-D tensor, got shape ", out.sizes());
  TORCH_CHECK(step >= 0, "gaussian_noise_: step must be >= 0, got ", step);
  TORCH_CHECK(offset >= 0, "gaussian_noise_: offset must be >= 0, got ", offset);
  TORCH_CHECK(draws >= 1, "gaussian_noise_: draws must be >= 1, got ", draws);
  const uint64_t useed = static_cast<uint64_t>(seed), ustep = static_cast<uint64_t>(step);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gaussian_noise_", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kNoiseGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; j += kNoiseGrain) {
        fill_noise(useed, ustep, static_cast<uint64_t>(offset + j), std::min(kNoiseGrain, hi - j),
                   draws, o + j);
      }
    });
  });
}

at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "philox4x32_10: counter and key must be int64");
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4 && key.dim() == 2 && key.size(1) == 2 &&
                  key.size(0) == counter.size(0),
              "philox4x32_10: expected counter (N, 4) and key (N, 2), got ", counter.sizes(),
              " and ", key.sizes());
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t n = 0; n < c.size(0); ++n) {
    dpseg::Philox4 x{};
    for (int w = 0; w < 4; ++w) x.x[w] = static_cast<uint32_t>(cp[4 * n + w]);
    x = dpseg::philox4x32_10(x, static_cast<uint32_t>(kp[2 * n]),
                             static_cast<uint32_t>(kp[2 * n + 1]));
    for (int w = 0; w < 4; ++w) op[4 * n + w] = static_cast<int64_t>(x.x[w]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpseg, CPU, m) {
  m.impl("gaussian_noise_", &gaussian_noise_cpu_);
  m.impl("philox4x32_10", &philox4x32_10_cpu);
}
