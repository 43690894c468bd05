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
}
