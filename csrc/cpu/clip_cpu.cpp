// CPU kernels for the DP-SGD step: per-sample squared norms, and the fused
// clip -> sum over the batch -> Gaussian noise -> scale pass.
//
// Both split the work into fixed-size blocks that do not depend on the thread count, so the
// results are the same bits with 1 or 64 threads; many small tensors (biases, norms) share one
// parallel_for instead of paying a thread hand-off each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "philox.h"

namespace {

// Norm blocks: 16K elements (64 KiB of float32) stream from memory in a few microseconds.
constexpr int64_t kNormBlock = 16384;
// Clip chunks: the float64 accumulator of one chunk (16 KiB) stays in L1 while the B rows
// stream through it; the noise then costs about 30 ns per element, so 2048 elements amortise
// the scheduling.
constexpr int64_t kClipChunk = 2048;

int64_t param_numel(const at::Tensor& g) {
  int64_t p = 1;
  for (int64_t d = 1; d < g.dim(); ++d) p *= g.size(d);
  return p;
}

// (B, P) contiguous view of a per-sample gradient; copies only non-contiguous inputs.
at::Tensor as_rows(const at::Tensor& g, int64_t batch) {
  return g.reshape({batch, param_numel(g)}).contiguous();
}

void check_grads(at::TensorList grads, const char* op) {
  TORCH_CHECK(!grads.empty(), op, ": grads must be a non-empty list of tensors");
  const int64_t batch = grads[0].dim() > 0 ? grads[0].size(0) : -1;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.dim() >= 1, op, ": grads[", i, "] must have a leading batch dimension");
    TORCH_CHECK(g.size(0) == batch, op, ": grads[", i, "] has batch size ", g.size(0),
                " but grads[0] has ", batch);
    TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble, op, ": grads[",
                i, "] must be float32 or float64, got ", g.scalar_type());
  }
}

// Eight independent float64 accumulators in a fixed pattern: vectorisable without
// -ffast-math, and the order (hence the bits) never depends on the compiler or the threads.
template <typename T>
double sum_squares(const T* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) {
      const double v = static_cast<double>(x[j + k]);
      acc[k] = acc[k] + v * v;
    }
  }
  double tail = 0.0;
  for (; j < n; ++j) {
    const double v = static_cast<double>(x[j]);
    tail = tail + v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

at::Tensor per_sample_sq_norms_cpu(at::TensorList grads) {
  check_grads(grads, "per_sample_sq_norms");
  const int64_t batch = grads[0].size(0);
  std::vector<at::Tensor> rows;
  struct Block {
    size_t tensor;
    int64_t b, start, len;
  };
  std::vector<Block> blocks;  // ordered (b, tensor, start): the final sum follows this order
  for (size_t i = 0; i < grads.size(); ++i) rows.push_back(as_rows(grads[i], batch));
  for (int64_t b = 0; b < batch; ++b) {
    for (size_t i = 0; i < rows.size(); ++i) {
      const int64_t p = rows[i].size(1);
      for (int64_t s = 0; s < p; s += kNormBlock) blocks.push_back({i, b, s, std::min(kNormBlock, p - s)});
    }
  }
  std::vector<double> partial(blocks.size());
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const Block& k = blocks[n];
      const at::Tensor& r = rows[k.tensor];
      AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "per_sample_sq_norms", [&] {
        const scalar_t* x = r.const_data_ptr<scalar_t>() + k.b * r.size(1) + k.start;
        partial[n] = sum_squares(x, k.len);
      });
    }
  });
  at::Tensor out = at::zeros({batch}, grads[0].options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t n = 0; n < blocks.size(); ++n) o[blocks[n].b] += partial[n];
  return out;
}

std::vector<at::Tensor> clip_accumulate_noise_cpu(at::TensorList grads,
                                                  const at::Tensor& clip_factors, double noise_std,
                                                  double scale, int64_t seed, int64_t step,
                                                  int64_t draws, at::IntArrayRef offsets) {
  check_grads(grads, "clip_accumulate_noise");
  const int64_t batch = grads[0].size(0);
  TORCH_CHECK(clip_factors.dim() == 1 && clip_factors.size(0) == batch &&
                  clip_factors.scalar_type() == at::kDouble,
              "clip_accumulate_noise: clip_factors must be float64 of shape (", batch,
              ",), got ", clip_factors.scalar_type(), " ", clip_factors.sizes());
  TORCH_CHECK(offsets.size() == grads.size(), "clip_accumulate_noise: got ", offsets.size(),
              " offsets for ", grads.size(), " tensors");
  TORCH_CHECK(step >= 0, "clip_accumulate_noise: step must be >= 0, got ", step);
  TORCH_CHECK(draws >= 1, "clip_accumulate_noise: draws must be >= 1, got ", draws);
  const at::Tensor cf = clip_factors.contiguous();
  const double* c = cf.const_data_ptr<double>();

  std::vector<at::Tensor> rows, outs;
  struct Chunk {
    size_t tensor;
    int64_t start, len;
  };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(offsets[i] >= 0, "clip_accumulate_noise: offsets must be >= 0");
    rows.push_back(as_rows(grads[i], batch));
    outs.push_back(at::empty(grads[i].sizes().slice(1), grads[i].options()));
    const int64_t p = rows[i].size(1);
    for (int64_t s = 0; s < p; s += kClipChunk) chunks.push_back({i, s, std::min(kClipChunk, p - s)});
  }
  const uint64_t useed = static_cast<uint64_t>(seed), ustep = static_cast<uint64_t>(step);

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    double acc[kClipChunk], z[kClipChunk];
    for (int64_t n = lo; n < hi; ++n) {
      const Chunk& k = chunks[n];
      const at::Tensor& r = rows[k.tensor];
      const int64_t p = r.size(1), len = k.len;
      AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "clip_accumulate_noise", [&] {
        for (int64_t j = 0; j < len; ++j) acc[j] = 0.0;
        // Sequential over b for every element (the contract's summation order), but each
        // row streams contiguously through the chunk's accumulator.
        const scalar_t* g = r.const_data_ptr<scalar_t>() + k.start;
        for (int64_t b = 0; b < batch; ++b) {
          const double cb = c[b];
          const scalar_t* gb = g + b * p;
          for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] + cb * static_cast<double>(gb[j]);
        }
        if (noise_std != 0.0) {
          const uint64_t e0 = static_cast<uint64_t>(offsets[k.tensor] + k.start);
          dpseg::cpu::philox_noise_block(useed, ustep, e0, len, draws, z);
          for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] + noise_std * z[j];
        }
        scalar_t* o = outs[k.tensor].data_ptr<scalar_t>() + k.start;
        for (int64_t j = 0; j < len; ++j) o[j] = static_cast<scalar_t>(acc[j] * scale);
      });
    }
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpseg, CPU, m) {
  m.impl("per_sample_sq_norms", &per_sample_sq_norms_cpu);
  m.impl("clip_accumulate_noise", &clip_accumulate_noise_cpu);
}
