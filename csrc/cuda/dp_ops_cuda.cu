// CUDA kernels of the fused DP ops: per-sample squared norms, clip + accumulate + Philox
// noise, the same fused with torch.optim's SGD / Adam(W) update, and the bare noise.
//
// Built with --fmad=false (setup.py): the float64 sums follow the contract's order
// (acc = acc + c_b * g_b for b = 0..B-1, + noise_std * z, * scale, one rounding) with no
// contracted multiply-add, and philox.h's Gaussian uses only IEEE-exact operations (double
// / and sqrt are correctly rounded in CUDA), so the result is the same bits as the CPU op,
// the Triton kernel and the PyTorch reference.
//
// Multi-tensor: one launch covers every tensor of a dtype; block `chunk` finds its tensor by
// a binary search over the rows' first_chunk (50-odd rows: 6 probes, cached loads).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/dp_ops.cuh"
#include "philox.h"

namespace dpseg {
namespace cuda {
namespace {

__device__ __forceinline__ int find_row(const TensorRow* rows, int n, int64_t chunk) {
  int lo = 0, hi = n - 1;  // largest i with rows[i].first_chunk <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (rows[mid].first_chunk <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Deterministic block sum: warp shuffles in a fixed tree, then warp 0 over the warp sums.
__device__ __forceinline__ double block_sum(double v, double* smem) {
  for (int o = 16; o > 0; o >>= 1) v = v + __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < (kThreads / 32) ? smem[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v = v + __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // smem is reused by the next call
  return v;         // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sq_norms_kernel(const TensorRow* __restrict__ rows, int n_tensors, int64_t n_chunks,
                    int64_t batch, double* __restrict__ partial) {
  __shared__ double smem[kThreads / 32];
  const int64_t chunk = blockIdx.x;
  const TensorRow row = rows[find_row(rows, n_tensors, chunk)];
  const int64_t base = (chunk - row.first_chunk) * kChunk;
  const T* g = static_cast<const T*>(row.grad);
  for (int64_t b = 0; b < batch; ++b) {
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = base + k * kThreads + threadIdx.x;
      if (j < row.numel) {
        const double v = static_cast<double>(g[b * row.numel + j]);
        s = s + v * v;
      }
    }
    s = block_sum(s, smem);
    if (threadIdx.x == 0) partial[b * n_chunks + chunk] = s;
  }
}

// out[b] = sum over chunks of partial[b, :], in a fixed order (one block per sample).
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(const double* __restrict__ partial, int64_t n_chunks,
                       double* __restrict__ out) {
  __shared__ double smem[kThreads / 32];
  const double* p = partial + blockIdx.x * n_chunks;
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < n_chunks; j += kThreads) s = s + p[j];
  s = block_sum(s, smem);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// The contract's float64 value of element j of the row's DP gradient, given its noise z.
template <typename T>
__device__ __forceinline__ double dp_value(const TensorRow& row, int64_t j, int64_t batch,
                                           const double* __restrict__ clip,
                                           const NoiseParams& noise, double z) {
  const T* g = static_cast<const T*>(row.grad);
  double acc = 0.0;
  for (int64_t b = 0; b < batch; ++b) acc = acc + clip[b] * static_cast<double>(g[b * row.numel + j]);
  if (noise.noise_std != 0.0) acc = acc + noise.noise_std * z;
  return acc * noise.scale;
}

// kOpt: 0 = plain clip/noise, 1 = SGD, 2 = Adam / AdamW.
//
// A tensor's chunks start one element early when its noise offset is odd (chunks_of counts
// it; that lane is skipped), so a chunk begins at an even element of the noise stream. With
// draws == 1 its threads then compute the chunk's kChunk / 2 Philox blocks once each into
// shared memory, both Box-Muller outputs in place, before the coalesced element loop; with
// draws > 1 each element draws its own (an even draws owns whole blocks).
template <typename T, int kOpt>
__global__ void __launch_bounds__(kThreads)
    clip_kernel(const TensorRow* __restrict__ rows, int n_tensors, int64_t batch,
                const double* __restrict__ clip, NoiseParams noise, double root, SgdParams sgd,
                AdamParams adam) {
  __shared__ double chunk_noise[kChunk];
  const int64_t chunk = blockIdx.x;
  const TensorRow row = rows[find_row(rows, n_tensors, chunk)];
  const int64_t base = (chunk - row.first_chunk) * kChunk - (row.noise_offset & 1);
  const bool has_noise = noise.noise_std != 0.0;
  const bool paired = has_noise && noise.draws == 1;  // the same for every thread
  if (paired) {
    const uint64_t q0 = static_cast<uint64_t>(row.noise_offset + base) >> 1;
    for (int p = threadIdx.x; p < kChunk / 2; p += kThreads) {
      const NormalPair n = philox_normal_pair(noise.seed, noise.step, q0 + p);
      chunk_noise[2 * p] = n.n0;
      chunk_noise[2 * p + 1] = n.n1;
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int lane = k * kThreads + threadIdx.x;
    const int64_t j = base + lane;
    if (j < 0 || j >= row.numel) continue;
    double z = 0.0;
    if (paired) {
      z = chunk_noise[lane];
    } else if (has_noise) {
      z = philox_noise(noise.seed, noise.step, static_cast<uint64_t>(row.noise_offset + j),
                       noise.draws, root);
    }
    T grad = static_cast<T>(dp_value<T>(row, j, batch, clip, noise, z));
    static_cast<T*>(row.out)[j] = grad;
    if (kOpt == 0) continue;
    T* p_ptr = static_cast<T*>(row.param);
    T* s1 = static_cast<T*>(row.state1);
    T p = p_ptr[j];
    if (kOpt == 1) {
      if (sgd.maximize) grad = -grad;
      const T momentum = static_cast<T>(sgd.momentum);
      T d_p = grad + static_cast<T>(sgd.weight_decay) * p;
      if (sgd.momentum != 0.0) {
        const T buf = sgd.first_step
                          ? d_p
                          : s1[j] * momentum + static_cast<T>(sgd.one_minus_dampening) * d_p;
        s1[j] = buf;
        d_p = sgd.nesterov ? d_p + momentum * buf : buf;
      }
      p = p - static_cast<T>(sgd.lr) * d_p;
    } else {
      if (adam.maximize) grad = -grad;
      T* s2 = static_cast<T*>(row.state2);
      if (adam.decoupled) {
        p = p * static_cast<T>(adam.decay);
      } else {
        grad = grad + static_cast<T>(adam.weight_decay) * p;
      }
      T m = s1[j], v = s2[j];
      m = m + static_cast<T>(adam.one_minus_beta1) * (grad - m);
      v = v * static_cast<T>(adam.beta2) + static_cast<T>(1.0 - adam.beta2) * grad * grad;
      s1[j] = m;
      s2[j] = v;
      const T denom = sqrt(v) / static_cast<T>(adam.bias_correction2_sqrt) +
                      static_cast<T>(adam.eps);
      p = p - (static_cast<T>(adam.step_size) * m) / denom;  // addcdiv: (value * t1) / t2
    }
    p_ptr[j] = p;
  }
}

// draws == 1: thread-strided over Philox blocks from the even element at or below offset, each
// block's two normals written to their two elements (the one before offset or past the end
// skipped). draws > 1: one element per iteration.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    noise_kernel(T* __restrict__ out, int64_t numel, uint64_t seed, uint64_t step, int64_t offset,
                 int64_t draws, double root) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (draws == 1) {
    const int64_t shift = offset & 1;
    const int64_t n_blocks = (numel + shift + 1) / 2;
    const uint64_t q0 = static_cast<uint64_t>(offset) >> 1;
    for (int64_t p = first; p < n_blocks; p += stride) {
      const NormalPair n = philox_normal_pair(seed, step, q0 + static_cast<uint64_t>(p));
      const int64_t j = 2 * p - shift;  // element of n.n0
      if (j >= 0) out[j] = static_cast<T>(n.n0);
      if (j + 1 < numel) out[j + 1] = static_cast<T>(n.n1);
    }
    return;
  }
  for (int64_t j = first; j < numel; j += stride) {
    out[j] = static_cast<T>(philox_noise(seed, step, static_cast<uint64_t>(offset + j), draws, root));
  }
}

double root_of(int64_t draws) { return ::sqrt(static_cast<double>(draws)); }

template <int kOpt>
cudaError_t launch_clip(const TensorRow* rows, int n_tensors, int64_t n_chunks, int64_t batch,
                        Dtype dtype, const double* clip, NoiseParams noise, SgdParams sgd,
                        AdamParams adam, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  const double root = root_of(noise.draws);
  const dim3 grid(static_cast<unsigned>(n_chunks));
  if (dtype == Dtype::kFloat32) {
    clip_kernel<float, kOpt><<<grid, kThreads, 0, stream>>>(rows, n_tensors, batch, clip, noise,
                                                            root, sgd, adam);
  } else {
    clip_kernel<double, kOpt><<<grid, kThreads, 0, stream>>>(rows, n_tensors, batch, clip, noise,
                                                             root, sgd, adam);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t per_sample_sq_norms(const TensorRow* rows, int n_tensors, int64_t n_chunks,
                                int64_t batch, Dtype dtype, double* partial, double* out,
                                cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (n_chunks == 0) return cudaMemsetAsync(out, 0, batch * sizeof(double), stream);
  const dim3 grid(static_cast<unsigned>(n_chunks));
  if (dtype == Dtype::kFloat32) {
    sq_norms_kernel<float><<<grid, kThreads, 0, stream>>>(rows, n_tensors, n_chunks, batch, partial);
  } else {
    sq_norms_kernel<double><<<grid, kThreads, 0, stream>>>(rows, n_tensors, n_chunks, batch, partial);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_rows_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(partial, n_chunks, out);
  return cudaGetLastError();
}

cudaError_t clip_accumulate_noise(const TensorRow* rows, int n_tensors, int64_t n_chunks,
                                  int64_t batch, Dtype dtype, const double* clip,
                                  NoiseParams noise, cudaStream_t stream) {
  return launch_clip<0>(rows, n_tensors, n_chunks, batch, dtype, clip, noise, SgdParams{},
                        AdamParams{}, stream);
}

cudaError_t clip_accumulate_noise_sgd(const TensorRow* rows, int n_tensors, int64_t n_chunks,
                                      int64_t batch, Dtype dtype, const double* clip,
                                      NoiseParams noise, SgdParams sgd, cudaStream_t stream) {
  return launch_clip<1>(rows, n_tensors, n_chunks, batch, dtype, clip, noise, sgd, AdamParams{},
                        stream);
}

cudaError_t clip_accumulate_noise_adam(const TensorRow* rows, int n_tensors, int64_t n_chunks,
                                       int64_t batch, Dtype dtype, const double* clip,
                                       NoiseParams noise, AdamParams adam, cudaStream_t stream) {
  return launch_clip<2>(rows, n_tensors, n_chunks, batch, dtype, clip, noise, SgdParams{}, adam,
                        stream);
}

cudaError_t gaussian_noise(void* out, Dtype dtype, int64_t numel, uint64_t seed, uint64_t step,
                           int64_t offset, int64_t draws, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int64_t work = draws == 1 ? (numel + 2) / 2 : numel;  // Philox blocks or elements
  const int64_t blocks64 = (work + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  const double root = root_of(draws);
  if (dtype == Dtype::kFloat32) {
    noise_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<float*>(out), numel, seed,
                                                         step, offset, draws, root);
  } else {
    noise_kernel<double><<<blocks, kThreads, 0, stream>>>(static_cast<double*>(out), numel, seed,
                                                          step, offset, draws, root);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dpseg
