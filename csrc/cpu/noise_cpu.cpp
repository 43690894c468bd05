// CPU kernels for the pure noise ops: gaussian_noise_ and the raw Philox test op. The noise
// itself comes from philox_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "philox.h"

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
