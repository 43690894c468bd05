// CPU implementations of clip_accumulate_noise_{sgd,adam}_: the C++ clip op, then
// torch.optim's single-tensor update written with the same ATen calls torch.optim makes
// (so the CPU results are torch.optim's, bit for bit). The fusion pays off on GPUs (one
// pass instead of three over P, csrc/cuda/); on the CPU this is the reference the CUDA
// kernels are held to.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

std::vector<at::Tensor> dp_grads(at::TensorList grads, const at::Tensor& clip_factors,
                                 double noise_std, double scale, int64_t seed, int64_t step,
                                 int64_t draws, at::IntArrayRef offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dpseg::clip_accumulate_noise", "")
                       .typed<std::vector<at::Tensor>(at::TensorList, const at::Tensor&, double,
                                                      double, int64_t, int64_t, int64_t,
                                                      at::IntArrayRef)>();
  return op.call(grads, clip_factors, noise_std, scale, seed, step, draws, offsets);
}

void check_like(at::TensorList params, at::TensorList grads, at::TensorList state,
                const char* op, const char* what) {
  TORCH_CHECK(state.size() == params.size(), op, ": one ", what, " per parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(state[i].sizes() == params[i].sizes(), op, ": ", what, "[", i, "] has shape ",
                state[i].sizes(), ", its parameter ", params[i].sizes());
  }
  (void)grads;
}

std::vector<at::Tensor> clip_accumulate_noise_sgd_cpu(
    at::TensorList params, at::TensorList momentum_buffers, at::TensorList grads,
    const at::Tensor& clip_factors, double noise_std, double scale, int64_t seed, int64_t step,
    int64_t draws, at::IntArrayRef offsets, double lr, double momentum, double dampening,
    double weight_decay, bool nesterov, bool maximize, bool first_step) {
  TORCH_CHECK(params.size() == grads.size(), "clip_accumulate_noise_sgd_: one param per grad");
  if (momentum != 0.0) {
    check_like(params, grads, momentum_buffers, "clip_accumulate_noise_sgd_", "momentum buffer");
  }
  std::vector<at::Tensor> out =
      dp_grads(grads, clip_factors, noise_std, scale, seed, step, draws, offsets);
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i];
    at::Tensor d_p = maximize ? out[i].neg() : out[i];
    if (weight_decay != 0.0) d_p = d_p.add(p, weight_decay);
    if (momentum != 0.0) {
      at::Tensor buf = momentum_buffers[i];
      if (first_step) {
        buf.copy_(d_p);
      } else {
        buf.mul_(momentum).add_(d_p, 1.0 - dampening);
      }
      d_p = nesterov ? d_p.add(buf, momentum) : buf;
    }
    p.add_(d_p, -lr);
  }
  return out;
}

std::vector<at::Tensor> clip_accumulate_noise_adam_cpu(
    at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList grads, const at::Tensor& clip_factors, double noise_std, double scale,
    int64_t seed, int64_t step, int64_t draws, at::IntArrayRef offsets, double lr, double beta1,
    double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
    int64_t optimizer_step) {
  const char* op = "clip_accumulate_noise_adam_";
  TORCH_CHECK(params.size() == grads.size(), op, ": one param per grad");
  TORCH_CHECK(optimizer_step >= 1, op, ": optimizer_step must be >= 1, got ", optimizer_step);
  check_like(params, grads, exp_avgs, op, "exp_avg");
  check_like(params, grads, exp_avg_sqs, op, "exp_avg_sq");
  std::vector<at::Tensor> out =
      dp_grads(grads, clip_factors, noise_std, scale, seed, step, draws, offsets);
  const double t = static_cast<double>(optimizer_step);
  const double step_size = lr / (1.0 - std::pow(beta1, t));
  const double bc2_sqrt = std::pow(1.0 - std::pow(beta2, t), 0.5);
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i];
    at::Tensor g = maximize ? out[i].neg() : out[i];
    if (weight_decay != 0.0) {
      if (decoupled) {
        p.mul_(1.0 - lr * weight_decay);
      } else {
        g = g.add(p, weight_decay);
      }
    }
    at::Tensor m = exp_avgs[i], v = exp_avg_sqs[i];
    m.lerp_(g, 1.0 - beta1);
    v.mul_(beta2).addcmul_(g, g, 1.0 - beta2);
    const at::Tensor denom = (v.sqrt() / bc2_sqrt).add_(eps);
    p.addcdiv_(m, denom, -step_size);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpseg, CPU, m) {
  m.impl("clip_accumulate_noise_sgd_", &clip_accumulate_noise_sgd_cpu);
  m.impl("clip_accumulate_noise_adam_", &clip_accumulate_noise_adam_cpu);
}
