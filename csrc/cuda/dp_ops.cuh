// CUDA kernels of the fused DP ops, behind a plain C++ interface on the CUDA runtime alone
// (no torch headers), so `nvcc -c` checks them on machines without a GPU or a CUDA torch.
// dp_ops_binding.cpp turns torch tensors into these tables and registers the ops.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dpseg {
namespace cuda {

// One row per tensor of a multi-tensor launch (64 bytes). A block handles kChunk elements of
// one tensor: block `chunk` belongs to the last row whose first_chunk <= chunk.
struct TensorRow {
  const void* grad;      // per-sample gradients, (B, numel) contiguous
  int64_t numel;         // elements per sample
  int64_t noise_offset;  // element index of grad[:, 0] in the noise stream
  int64_t first_chunk;   // index of this tensor's first block
  void* out;             // (numel,) DP gradient
  void* param;           // update kernels: the parameter (numel,)
  void* state1;          // momentum buffer / exp_avg
  void* state2;          // exp_avg_sq
};

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kChunk = kThreads * kPerThread;  // 1024 elements per block

// Chunks of a tensor whose noise stream starts at noise_offset: one element more when that is
// odd, so that every chunk starts at an even element (clip_kernel pairs up Philox outputs).
inline int64_t chunks_of(int64_t numel, int64_t noise_offset = 0) {
  return (numel + (noise_offset & 1) + kChunk - 1) / kChunk;
}

enum class Dtype : int { kFloat32 = 0, kFloat64 = 1 };

struct NoiseParams {
  double noise_std;
  double scale;
  uint64_t seed;
  uint64_t step;
  int64_t draws;
};

// torch.optim's hyper-parameters, with the host-side scalars torch.optim computes in Python
// doubles already folded (step_size = lr / (1 - beta1^t), bias_correction2_sqrt).
struct SgdParams {
  double lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize, first_step;
};
struct AdamParams {
  double one_minus_beta1, beta2, step_size, bias_correction2_sqrt, eps, weight_decay;
  double decay;  // 1 - lr * weight_decay (decoupled, AdamW)
  bool decoupled, maximize;
};

// partial: (batch, n_chunks) float64 scratch; out: (batch,) float64.
cudaError_t per_sample_sq_norms(const TensorRow* rows, int n_tensors, int64_t n_chunks,
                                int64_t batch, Dtype dtype, double* partial, double* out,
                                cudaStream_t stream);

// clip: (batch,) float64 factors. Writes rows[i].out.
cudaError_t clip_accumulate_noise(const TensorRow* rows, int n_tensors, int64_t n_chunks,
                                  int64_t batch, Dtype dtype, const double* clip,
                                  NoiseParams noise, cudaStream_t stream);

cudaError_t clip_accumulate_noise_sgd(const TensorRow* rows, int n_tensors, int64_t n_chunks,
                                      int64_t batch, Dtype dtype, const double* clip,
                                      NoiseParams noise, SgdParams sgd, cudaStream_t stream);

cudaError_t clip_accumulate_noise_adam(const TensorRow* rows, int n_tensors, int64_t n_chunks,
                                       int64_t batch, Dtype dtype, const double* clip,
                                       NoiseParams noise, AdamParams adam, cudaStream_t stream);

// out[j] = z(seed, step, offset + j, draws) for j < numel.
cudaError_t gaussian_noise(void* out, Dtype dtype, int64_t numel, uint64_t seed, uint64_t step,
                           int64_t offset, int64_t draws, cudaStream_t stream);

}  // namespace cuda
}  // namespace dpseg
