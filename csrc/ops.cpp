// The dpseg op library: one schema per op, shared by every backend (CPU in csrc/cpu/, CUDA in
// csrc/cuda/ when built). Python-side fakes (dpseg/ops/_ext.py) make them traceable.
#include <Python.h>
#include <torch/library.h>

// `import dpseg._C` only has to load this shared object: the static registrations below and
// in csrc/cpu/*.cpp then run, and the ops appear under torch.ops.dpseg.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dpseg, m) {
  // Sum over every tensor and element of grads[i][b]**2, accumulated in float64: (B,) float64.
  m.def("per_sample_sq_norms(Tensor[] grads) -> Tensor");
  // out_i = scale * (sum_b c_b G_i[b] + noise_std * z(seed, step, offsets[i] + j, draws)),
  // float64 inside, rounded once to G_i's dtype. seed is a uint64 in two's complement.
  m.def(
      "clip_accumulate_noise(Tensor[] grads, Tensor clip_factors, float noise_std, float scale, "
      "int seed, int step, int draws, int[] offsets) -> Tensor[]");
  // Fills out (1-D, float32/float64, contiguous) with z for elements offset .. offset + numel.
  m.def("gaussian_noise_(Tensor(a!) out, int seed, int step, int offset, int draws) -> ()");
  // Raw Philox4x32-10 for known-answer tests: int64 (N, 4) counters, (N, 2) keys -> (N, 4).
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  // clip_accumulate_noise fused with torch.optim's update (foreach=False semantics): updates
  // params and their state in place and returns the DP gradients (for p.grad).
  // first_step: the momentum buffers are initialised to the first gradient, as torch.optim.
  m.def(
      "clip_accumulate_noise_sgd_(Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, "
      "Tensor[] grads, Tensor clip_factors, float noise_std, float scale, int seed, int step, "
      "int draws, int[] offsets, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool first_step) -> Tensor[]");
  // Adam, or AdamW with decoupled; optimizer_step = the step count after this step (>= 1).
  m.def(
      "clip_accumulate_noise_adam_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] grads, Tensor clip_factors, float noise_std, "
      "float scale, int seed, int step, int draws, int[] offsets, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled, bool maximize, "
      "int optimizer_step) -> Tensor[]");
  // GroupNorm backward keeping the batch: (grad_input or an empty tensor when not
  // input_grad, dgamma (N, C), dbeta (N, C)); mean/rstd as aten.native_group_norm returns.
  m.def(
      "group_norm_backward_per_sample(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, "
      "Tensor? weight, int groups, bool input_grad=True) -> (Tensor, Tensor, Tensor)");
  // Per-sample weight gradient of an ungrouped 3-D conv with few input floats per output
  // position (a first layer): grad_out (B, Cout, OZ, OY, OX), x already padded (B, Cin, Z,
  // Y, X) -> (B, Cout, Cin, kz, ky, kx). Lower dimensions come in with leading sizes of 1.
  m.def(
      "conv_weight_grad_per_sample(Tensor grad_out, Tensor x, int[] kernel, int[] stride, "
      "int[] dilation) -> Tensor");
}
