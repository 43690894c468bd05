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

// The scalar philox_noise costs ~58 ns per normal on one core (branches on the quarter turn
// and the mantissa range). Here each stage is a straight loop over a block, with selects of
// constants instead of branches and exact bit tricks instead of int64 -> double conversions,
// so GCC 12 vectorises them: Philox for every clone, ln and cos in the AVX-512 clone (the
// AVX2 one still sees control flow); ~31 ns per normal on a loaded AMD EPYC core. Vector
// + - * / are the same IEEE operations as scalar ones (and -ffp-contract=off forbids FMA),
// so the bits do not change: tests/test_ops_philox.py checks it.
constexpr int64_t kBlock = 256;

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

// normals[j] = philox_normal(seed, step, d0 + j), n <= kBlock.
DPSEG_CPU_CLONES void normals_block(uint64_t seed, uint64_t step, uint64_t d0, int64_t n,
                                    double* normals) {
  uint32_t k0[10], k1[10];
  k0[0] = static_cast<uint32_t>(seed);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int r = 1; r < 10; ++r) {
    k0[r] = k0[r - 1] + kPhiloxW0;
    k1[r] = k1[r - 1] + kPhiloxW1;
  }
  const uint32_t s0 = static_cast<uint32_t>(step), s1 = static_cast<uint32_t>(step >> 32);
  double u1[kBlock], u2[kBlock];
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t d = d0 + static_cast<uint64_t>(j);
    uint32_t c0 = static_cast<uint32_t>(d), c1 = static_cast<uint32_t>(d >> 32), c2 = s0, c3 = s1;
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
    const double n2 = small_uint_to_double(c2 >> 5) * 67108864.0 + small_uint_to_double(c3 >> 6);
    u1[j] = (n1 + 0.5) * 0x1p-53;
    u2[j] = n2 * 0x1p-53;
  }
  // -2 ln u1, as exact_ops_log (u1 is normal: its exponent field is never 0).
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t bits = double_to_bits(u1[j]);
    double m = bits_to_double((bits & 0x000FFFFFFFFFFFFFull) | 0x3FE0000000000000ull);
    double e = small_uint_to_double(bits >> 52) - 1022.0;
    // Selects of constants, not of results: if-conversion must not speculate an FP op.
    const bool small = m < kSqrtHalf;
    m = m * (small ? 2.0 : 1.0);  // exact either way, as are e - 1 and e - 0
    e = e - (small ? 1.0 : 0.0);
    const double f = m - 1.0;
    const double s = f / (f + 2.0);
    const double z = s * s;
    double q = kLnC[10];
#pragma GCC unroll 10
    for (int k = 9; k >= 0; --k) q = q * z + kLnC[k];
    const double ln_m = 2.0 * (s + s * (z * q));
    u1[j] = -2.0 * (e * kLn2Hi + (ln_m + e * kLn2Lo));
  }
  // cos(2 pi u2), as exact_ops_cos_2pi, both polynomials then a select.
  for (int64_t j = 0; j < n; ++j) {
    const double v = u2[j] * 4.0;
    const int32_t kt = static_cast<int32_t>(v);
    double r = v - static_cast<double>(kt);
    const bool fold = r > 0.5;
    r = r - (fold ? 1.0 : 0.0);
    const int32_t k = kt + (fold ? 1 : 0);
    const double t = r * kPiOver2;
    const double z = t * t;
    double pc = kCosC[8], ps = kSinC[8];
#pragma GCC unroll 8
    for (int i = 7; i >= 0; --i) {
      pc = pc * z + kCosC[i];
      ps = ps * z + kSinC[i];
    }
    const double c = 1.0 + z * pc;
    const double sn = t + t * (z * ps);
    const double val = (k & 1) ? sn : c;
    const double sign = ((k + 1) & 2) ? -1.0 : 1.0;  // quarter turns 1, 2 are negative
    normals[j] = val * sign;
  }
  // sqrt in its own loop: without -fno-math-errno its errno branch would stop the loops above
  // from vectorising.
  for (int64_t j = 0; j < n; ++j) normals[j] = sqrt(u1[j]) * normals[j];
}

}  // namespace

void philox_noise_block(uint64_t seed, uint64_t step, uint64_t e0, int64_t n, int64_t draws,
                        double* out) {
  if (draws == 1) {  // s / sqrt(1) == s exactly: no division
    for (int64_t j = 0; j < n; j += kBlock) {
      normals_block(seed, step, e0 + j, std::min(kBlock, n - j), out + j);
    }
    return;
  }
  const double root = std::sqrt(static_cast<double>(draws));
  if (draws > kBlock) {  // not a real use; keep it simple
    for (int64_t j = 0; j < n; ++j) out[j] = philox_noise(seed, step, e0 + j, draws, root);
    return;
  }
  double normals[kBlock];
  const int64_t per = kBlock / draws;  // elements per block of normals
  for (int64_t j = 0; j < n; j += per) {
    const int64_t m = std::min(per, n - j);
    normals_block(seed, step, (e0 + j) * static_cast<uint64_t>(draws), m * draws, normals);
    for (int64_t i = 0; i < m; ++i) {
      double s = normals[i * draws];
      for (int64_t k = 1; k < draws; ++k) s = s + normals[i * draws + k];
      out[j + i] = s / root;
    }
  }
}

}  // namespace cpu
}  // namespace dpseg

namespace {

// 2048 normals (tens of microseconds) amortise the thread hand-off.
constexpr int64_t kNoiseGrain = 2048;

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
      double z[kNoiseGrain];
      for (int64_t j = lo; j < hi; j += kNoiseGrain) {
        const int64_t len = std::min(kNoiseGrain, hi - j);
        const uint64_t e0 = static_cast<uint64_t>(offset + j);
        dpseg::cpu::philox_noise_block(useed, ustep, e0, len, draws, z);
        for (int64_t i = 0; i < len; ++i) o[j + i] = static_cast<scalar_t>(z[i]);
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
