// Per-sample weight gradient of an ungrouped conv, computed directly: for sample b and output
// channel o, dW[b, o, c, k] = sum over output positions p of go[b, o, p] x[b, c, p s + k d],
// with x already padded. No patch matrix (Opacus's unfold, dpseg's `patches`: Cin x kernel
// floats per position) and no batch-of-one oneDNN call (slow at Cin = 1: it parallelises a
// weight gradient over the batch).
//
// Made for layers with few input floats per position -- a network's first layer on a
// one-channel scan -- where oneDNN's per-sample options are at their worst: SegResNet's 1->16
// 3x3x3 layer at 48^3, B = 2, 2 threads, batched (non-private) weight gradient 2.0 ms; per
// sample, loop 10.6, grouped 8-22, patches 5.3.
//
// Schedule: one task per (b, o). For each output plane z, every tap (c, kz, ky, kx) adds its
// products over the plane into kLanes float lanes, which are added into double lanes after
// the plane, so no float sum runs over more than a plane's positions / kLanes products.
// Fixed order: the same bits on any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DPSEG_CONV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DPSEG_CONV_CLONES
#endif

struct Geometry {
  int64_t C, OZ, OY, OX, Z, Y, X, KZ, KY, KX, sz, sy, sx, dz, dy, dx;
};

constexpr int kLanes = 64;  // four AVX-512 registers of floats: four independent chains

// acc[l] += sum over i < n, i % kLanes == l, of g[i] * x[i * step] (the tail's i - n %
// kLanes .. n - 1 to lanes 0 ..): every lane's order is fixed by n alone.
template <typename T>
inline __attribute__((always_inline)) void dot_lanes(const T* __restrict__ g,
                                                     const T* __restrict__ x, int64_t n,
                                                     int64_t step, T* __restrict__ acc) {
  T a[kLanes];
  for (int l = 0; l < kLanes; ++l) a[l] = acc[l];
  int64_t i = 0;
  if (step == 1) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) a[l] = a[l] + g[i + l] * x[i + l];
    }
  } else {
    for (; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) a[l] = a[l] + g[i + l] * x[(i + l) * step];
    }
  }
  for (int l = 0; i < n; ++i, ++l) a[l] = a[l] + g[i] * x[i * step];
  for (int l = 0; l < kLanes; ++l) acc[l] = a[l];
}

// One task: sample b's gradient for output channel o, from o's output gradient g (OZ x OY x
// OX) and sample b's input x (C x Z x Y x X), into dst (C x KZ x KY x KX), plane by output
// plane z. Each tap k sums its products in kLanes float lanes over the plane (lanes, K x
// kLanes), added into double lanes (total) after each plane, reduced pairwise at the end.
// With unit stride in y and x and no dilation in x, the plane is first copied into ``pad``
// with x's row pitch (zeros past OX), so that a tap is one run over the plane, (OY - 1) X +
// OX long: a row of 48 is too short to pay for a loop of its own. Otherwise, row by row. (A
// pad column meets an input element that some other tap uses; the product is 0 unless that
// element is not finite, and then the sample's gradient is not finite either way. With a
// dilation in x, some elements are used by no tap, hence the condition.)
template <typename T>
DPSEG_CONV_CLONES void task(const Geometry& s, const T* g, const T* x, T* pad, T* lanes,
                            double* total, T* dst) {
  const int64_t K = s.C * s.KZ * s.KY * s.KX;
  const bool flat = s.sy == 1 && s.sx == 1 && s.dx == 1;
  for (int64_t i = 0; i < K * kLanes; ++i) total[i] = 0.0;
  for (int64_t z = 0; z < s.OZ; ++z) {
    const T* gz = g + z * s.OY * s.OX;
    if (flat) {
      for (int64_t y = 0; y < s.OY; ++y) {
        for (int64_t j = 0; j < s.OX; ++j) pad[y * s.X + j] = gz[y * s.OX + j];
        for (int64_t j = s.OX; j < s.X; ++j) pad[y * s.X + j] = T(0);
      }
    }
    for (int64_t i = 0; i < K * kLanes; ++i) lanes[i] = T(0);
    T* acc = lanes;
    for (int64_t c = 0; c < s.C; ++c) {
      for (int64_t kz = 0; kz < s.KZ; ++kz) {
        const T* plane = x + (c * s.Z + z * s.sz + kz * s.dz) * s.Y * s.X;
        for (int64_t ky = 0; ky < s.KY; ++ky) {
          for (int64_t kx = 0; kx < s.KX; ++kx, acc += kLanes) {
            const T* first = plane + ky * s.dy * s.X + kx * s.dx;
            if (flat) {
              dot_lanes(pad, first, (s.OY - 1) * s.X + s.OX, 1, acc);
              continue;
            }
            for (int64_t y = 0; y < s.OY; ++y) {
              dot_lanes(gz + y * s.OX, first + y * s.sy * s.X, s.OX, s.sx, acc);
            }
          }
        }
      }
    }
    for (int64_t i = 0; i < K * kLanes; ++i) total[i] = total[i] + static_cast<double>(lanes[i]);
  }
  for (int64_t k = 0; k < K; ++k) {
    double* v = total + k * kLanes;
    for (int w = kLanes / 2; w >= 1; w /= 2) {  // pairwise, in a fixed order
      for (int l = 0; l < w; ++l) v[l] = v[l] + v[l + w];
    }
    dst[k] = static_cast<T>(v[0]);
  }
}

at::Tensor conv_weight_grad_per_sample_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                           at::IntArrayRef kernel, at::IntArrayRef stride,
                                           at::IntArrayRef dilation) {
  const char* op = "conv_weight_grad_per_sample";
  TORCH_CHECK(grad_out.dim() == 5 && x.dim() == 5, op, ": grad_out and x must be 5-D (B, C, Z, Y, X), got ",
              grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(kernel.size() == 3 && stride.size() == 3 && dilation.size() == 3, op,
              ": kernel, stride and dilation take 3 values");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": float32 or float64 inputs, got ", x.scalar_type());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out and x dtypes differ");
  const int64_t B = x.size(0), C = x.size(1), O = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == B, op, ": grad_out has ", grad_out.size(0), " samples, x ", B);
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(kernel[d] >= 1 && stride[d] >= 1 && dilation[d] >= 1, op,
                ": kernel, stride and dilation must be positive");
    const int64_t reach = dilation[d] * (kernel[d] - 1) + 1;
    const int64_t positions = x.size(2 + d) >= reach ? (x.size(2 + d) - reach) / stride[d] + 1 : 0;
    TORCH_CHECK(grad_out.size(2 + d) == positions, op, ": grad_out's spatial dim ", d, " is ",
                grad_out.size(2 + d), "; the padded input gives ", positions, " positions");
  }
  const int64_t KZ = kernel[0], KY = kernel[1], KX = kernel[2];
  const int64_t K = C * KZ * KY * KX;
  at::Tensor out = at::empty({B, O, C, KZ, KY, KX}, x.options());
  if (out.numel() == 0) return out;
  if (grad_out.numel() == 0) return out.zero_();  // no positions: no products (and no reads)
  const at::Tensor go = grad_out.contiguous(), xc = x.contiguous();
  const int64_t OZ = go.size(2), OY = go.size(3), OX = go.size(4);
  const int64_t Z = xc.size(2), Y = xc.size(3), X = xc.size(4);

  const Geometry geo{C, OZ, OY, OX, Z, Y, X, KZ, KY, KX, stride[0], stride[1], stride[2],
                     dilation[0], dilation[1], dilation[2]};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_weight_grad_per_sample", [&] {
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * O, 1, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> pad(OY * X), lanes(K * kLanes);
      std::vector<double> total(K * kLanes);
      for (int64_t t = lo; t < hi; ++t) {
        task(geo, gp + t * OZ * OY * OX, xp + (t / O) * C * Z * Y * X, pad.data(),
             lanes.data(), total.data(), dst + t * K);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dpseg, CPU, m) {
  m.impl("conv_weight_grad_per_sample", &conv_weight_grad_per_sample_cpu);
}
