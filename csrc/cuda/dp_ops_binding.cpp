// Registers the CUDA kernels of csrc/cuda/dp_ops_cuda.cu for the CUDA key of the dpseg ops
// (schemas in csrc/ops.cpp). Only built in CUDA builds (setup.py, DPSEG_WITH_CUDA).
//
// The per-tensor table goes to the device through pinned memory and a non-blocking copy on
// the current stream, so a DP step never synchronises the host with the GPU here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "cuda/dp_ops.cuh"

namespace {

using dpseg::cuda::Dtype;
using dpseg::cuda::TensorRow;

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

int64_t param_numel(const at::Tensor& g) {
  int64_t p = 1;
  for (int64_t d = 1; d < g.dim(); ++d) p *= g.size(d);
  return p;
}

void check_grads(at::TensorList grads, const char* op) {
  TORCH_CHECK(!grads.empty(), op, ": grads must be a non-empty list of tensors");
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].is_cuda() && grads[i].device() == grads[0].device(), op, ": grads[", i,
                "] must be on ", grads[0].device());
    TORCH_CHECK(grads[i].dim() >= 1 && grads[i].size(0) == grads[0].size(0), op, ": grads[", i,
                "] must share the batch size of grads[0]");
    TORCH_CHECK(grads[i].scalar_type() == at::kFloat || grads[i].scalar_type() == at::kDouble, op,
                ": grads[", i, "] must be float32 or float64");
  }
}

Dtype dtype_of(at::ScalarType t) { return t == at::kFloat ? Dtype::kFloat32 : Dtype::kFloat64; }

// One table per dtype group; keeps the (B, P) contiguous copies alive while kernels run.
struct Group {
  std::vector<size_t> index;     // positions in the op's tensor lists
  std::vector<at::Tensor> rows;  // contiguous per-sample gradients
  std::vector<TensorRow> table;
  int64_t chunks = 0;
};

// offsets: each tensor's noise offset (empty: no noise, all 0); an odd one adds a lane to the
// tensor's chunks (dp_ops.cuh, chunks_of).
std::vector<Group> group_by_dtype(at::TensorList grads, at::IntArrayRef offsets = {}) {
  std::vector<Group> groups(2);
  const int64_t batch = grads[0].size(0);
  for (size_t i = 0; i < grads.size(); ++i) {
    Group& g = groups[grads[i].scalar_type() == at::kFloat ? 0 : 1];
    const int64_t p = param_numel(grads[i]);
    if (p == 0) continue;
    at::Tensor r = grads[i].reshape({batch, p}).contiguous();
    TensorRow row{};
    row.grad = r.const_data_ptr();
    row.numel = p;
    row.noise_offset = offsets.empty() ? 0 : offsets[i];
    row.first_chunk = g.chunks;
    g.chunks += dpseg::cuda::chunks_of(p, row.noise_offset);
    g.index.push_back(i);
    g.rows.push_back(r);
    g.table.push_back(row);
  }
  return groups;
}

at::Tensor to_device(const std::vector<TensorRow>& table, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(TensorRow));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), bytes);
  return host.to(device, /*non_blocking=*/true);
}

const TensorRow* rows_ptr(const at::Tensor& t) {
  return reinterpret_cast<const TensorRow*>(t.const_data_ptr<uint8_t>());
}

at::Tensor per_sample_sq_norms_cuda(at::TensorList grads) {
  check_grads(grads, "per_sample_sq_norms");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const int64_t batch = grads[0].size(0);
  at::Tensor out = at::zeros({batch}, grads[0].options().dtype(at::kDouble));
  if (batch == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (Group& g : group_by_dtype(grads)) {
    if (g.table.empty()) continue;
    at::Tensor table = to_device(g.table, grads[0].device());
    at::Tensor partial = at::empty({batch, g.chunks}, out.options());
    at::Tensor part_out = at::empty({batch}, out.options());
    check_cuda(dpseg::cuda::per_sample_sq_norms(rows_ptr(table), static_cast<int>(g.table.size()),
                                                g.chunks, batch, dtype_of(g.rows[0].scalar_type()),
                                                partial.data_ptr<double>(),
                                                part_out.data_ptr<double>(), stream),
               "per_sample_sq_norms");
    out.add_(part_out);
  }
  return out;
}

dpseg::cuda::NoiseParams noise_params(double noise_std, double scale, int64_t seed, int64_t step,
                                      int64_t draws) {
  TORCH_CHECK(step >= 0 && draws >= 1, "clip_accumulate_noise: step >= 0 and draws >= 1");
  return {noise_std, scale, static_cast<uint64_t>(seed), static_cast<uint64_t>(step), draws};
}

// Shared by the plain and the fused-update ops: validates, builds the tables (with the
// optional parameter/state pointers), runs `launch` per dtype group, returns the DP grads.
template <typename Launch>
std::vector<at::Tensor> run_clip(at::TensorList grads, const at::Tensor& clip_factors,
                                 at::IntArrayRef offsets, at::TensorList params,
                                 at::TensorList state1, at::TensorList state2, const char* op,
                                 Launch launch) {
  check_grads(grads, op);
  const int64_t batch = grads[0].size(0);
  TORCH_CHECK(clip_factors.dim() == 1 && clip_factors.size(0) == batch &&
                  clip_factors.scalar_type() == at::kDouble &&
                  clip_factors.device() == grads[0].device(),
              op, ": clip_factors must be float64 (", batch, ",) on ", grads[0].device());
  TORCH_CHECK(offsets.size() == grads.size(), op, ": one offset per tensor");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const at::Tensor clip = clip_factors.contiguous();
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(offsets[i] >= 0, op, ": offsets must be >= 0");
    if (!params.empty()) {
      TORCH_CHECK(params[i].is_contiguous() && params[i].numel() == param_numel(grads[i]) &&
                      params[i].scalar_type() == grads[i].scalar_type(),
                  op, ": params[", i, "] must be contiguous and match its gradient");
      for (at::TensorList s : {state1, state2}) {
        if (!s.empty()) {
          TORCH_CHECK(s[i].is_contiguous() && s[i].sizes() == params[i].sizes() &&
                          s[i].scalar_type() == params[i].scalar_type(),
                      op, ": optimizer state ", i, " must be like its parameter");
        }
      }
      outs.push_back(at::empty_like(params[i]));
    } else {
      outs.push_back(at::empty(grads[i].sizes().slice(1), grads[i].options()));
    }
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (Group& g : group_by_dtype(grads, offsets)) {
    if (g.table.empty()) continue;
    for (size_t k = 0; k < g.table.size(); ++k) {
      const size_t i = g.index[k];
      g.table[k].out = outs[i].data_ptr();
      if (!params.empty()) g.table[k].param = params[i].data_ptr();
      if (!state1.empty()) g.table[k].state1 = state1[i].data_ptr();
      if (!state2.empty()) g.table[k].state2 = state2[i].data_ptr();
    }
    at::Tensor table = to_device(g.table, grads[0].device());
    check_cuda(launch(rows_ptr(table), static_cast<int>(g.table.size()), g.chunks, batch,
                      dtype_of(g.rows[0].scalar_type()), clip.const_data_ptr<double>(), stream),
               op);
  }
  // Tensors with no elements got no block; their outputs are already the right (empty) size.
  return outs;
}

std::vector<at::Tensor> clip_accumulate_noise_cuda(at::TensorList grads,
                                                   const at::Tensor& clip_factors,
                                                   double noise_std, double scale, int64_t seed,
                                                   int64_t step, int64_t draws,
                                                   at::IntArrayRef offsets) {
  const auto noise = noise_params(noise_std, scale, seed, step, draws);
  return run_clip(grads, clip_factors, offsets, {}, {}, {}, "clip_accumulate_noise",
                  [&](const TensorRow* rows, int n, int64_t chunks, int64_t batch, Dtype dt,
                      const double* clip, cudaStream_t stream) {
                    return dpseg::cuda::clip_accumulate_noise(rows, n, chunks, batch, dt, clip,
                                                              noise, stream);
                  });
}

std::vector<at::Tensor> clip_accumulate_noise_sgd_cuda(
    at::TensorList params, at::TensorList momentum_buffers, at::TensorList grads,
    const at::Tensor& clip_factors, double noise_std, double scale, int64_t seed, int64_t step,
    int64_t draws, at::IntArrayRef offsets, double lr, double momentum, double dampening,
    double weight_decay, bool nesterov, bool maximize, bool first_step) {
  TORCH_CHECK(params.size() == grads.size(), "clip_accumulate_noise_sgd_: one param per grad");
  TORCH_CHECK(momentum == 0.0 || momentum_buffers.size() == params.size(),
              "clip_accumulate_noise_sgd_: one momentum buffer per param");
  const auto noise = noise_params(noise_std, scale, seed, step, draws);
  const dpseg::cuda::SgdParams sgd{lr, momentum, 1.0 - dampening, weight_decay,
                                   nesterov, maximize, first_step};
  return run_clip(grads, clip_factors, offsets, params,
                  momentum != 0.0 ? momentum_buffers : at::TensorList{}, {},
                  "clip_accumulate_noise_sgd_",
                  [&](const TensorRow* rows, int n, int64_t chunks, int64_t batch, Dtype dt,
                      const double* clip, cudaStream_t stream) {
                    return dpseg::cuda::clip_accumulate_noise_sgd(rows, n, chunks, batch, dt,
                                                                  clip, noise, sgd, stream);
                  });
}

std::vector<at::Tensor> clip_accumulate_noise_adam_cuda(
    at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList grads, const at::Tensor& clip_factors, double noise_std, double scale,
    int64_t seed, int64_t step, int64_t draws, at::IntArrayRef offsets, double lr, double beta1,
    double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
    int64_t optimizer_step) {
  TORCH_CHECK(params.size() == grads.size() && exp_avgs.size() == grads.size() &&
                  exp_avg_sqs.size() == grads.size(),
              "clip_accumulate_noise_adam_: one param and two state tensors per grad");
  TORCH_CHECK(optimizer_step >= 1, "clip_accumulate_noise_adam_: optimizer_step >= 1");
  const auto noise = noise_params(noise_std, scale, seed, step, draws);
  const double t = static_cast<double>(optimizer_step);
  const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
  dpseg::cuda::AdamParams adam{};
  adam.one_minus_beta1 = 1.0 - beta1;
  adam.beta2 = beta2;
  adam.step_size = lr / bc1;
  adam.bias_correction2_sqrt = std::pow(bc2, 0.5);
  adam.eps = eps;
  adam.weight_decay = weight_decay;
  adam.decay = 1.0 - lr * weight_decay;
  adam.decoupled = decoupled;
  adam.maximize = maximize;
  return run_clip(grads, clip_factors, offsets, params, exp_avgs, exp_avg_sqs,
                  "clip_accumulate_noise_adam_",
                  [&](const TensorRow* rows, int n, int64_t chunks, int64_t batch, Dtype dt,
                      const double* clip, cudaStream_t stream) {
                    return dpseg::cuda::clip_accumulate_noise_adam(rows, n, chunks, batch, dt,
                                                                   clip, noise, adam, stream);
                  });
}

void gaussian_noise_cuda_(at::Tensor& out, int64_t seed, int64_t step, int64_t offset,
                          int64_t draws) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 1 && out.is_contiguous() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble),
              "gaussian_noise_: out must be a contiguous 1-D float32/float64 CUDA tensor");
  TORCH_CHECK(step >= 0 && offset >= 0 && draws >= 1,
              "gaussian_noise_: step, offset >= 0 and draws >= 1");
  const c10::cuda::CUDAGuard guard(out.device());
  check_cuda(dpseg::cuda::gaussian_noise(out.data_ptr(), dtype_of(out.scalar_type()), out.numel(),
                                         static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                         offset, draws, c10::cuda::getCurrentCUDAStream()),
             "gaussian_noise_");
}

}  // namespace

TORCH_LIBRARY_IMPL(dpseg, CUDA, m) {
  m.impl("per_sample_sq_norms", &per_sample_sq_norms_cuda);
  m.impl("clip_accumulate_noise", &clip_accumulate_noise_cuda);
  m.impl("clip_accumulate_noise_sgd_", &clip_accumulate_noise_sgd_cuda);
  m.impl("clip_accumulate_noise_adam_", &clip_accumulate_noise_adam_cuda);
  m.impl("gaussian_noise_", &gaussian_noise_cuda_);
}
