// Fused per-sample GroupNorm backward: grad_input and each sample's dgamma, dbeta from one
// read of (grad_out, x) for the channel sums and one more for grad_input, as ATen's own
// backward does (aten/src/ATen/native/cpu/group_norm_kernel.cpp) -- it then sums dgamma and
// dbeta over the batch, and this op simply does not.
//
// With ds[n,c] = sum_s dy*x, db[n,c] = sum_s dy, D = C/G channels per group, M = D*HxW:
//   dgamma[n,c] = (ds[n,c] - db[n,c] * mean[n,g]) * rstd[n,g]        dbeta[n,c] = db[n,c]
//   dx = c1 * dy + c2 * x + c3   with  c1 = rstd * gamma[c],
//   c2 = (sum_c db*gamma * mean - sum_c ds*gamma) * rstd^3 / M,  c3 = -c2 * mean - sum_c db*gamma * rstd / M
// Sums accumulate in double (eight lanes, fixed order: the same bits with any thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace {

// ATen's kernels are built per ISA; this file gets the baseline flags, so the two loops are
// cloned for AVX-512 and AVX2 (as noise_cpu.cpp does): the baseline SSE2 pass 1 was ~25%
// slower than ATen's whole backward on 2x16x64^3.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DPSEG_GN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DPSEG_GN_CLONES
#endif

#define DPSEG_PLANE_SUMS(T)                                                           \
  DPSEG_GN_CLONES void plane_sums(const T* dy, const T* x, int64_t n, double* ds,     \
                                  double* db) {                                       \
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};          \
    int64_t j = 0;                                                                    \
    for (; j + 8 <= n; j += 8) {                                                      \
      for (int k = 0; k < 8; ++k) {                                                   \
        const double g = static_cast<double>(dy[j + k]);                              \
        s[k] = s[k] + g * static_cast<double>(x[j + k]);                              \
        b[k] = b[k] + g;                                                              \
      }                                                                               \
    }                                                                                 \
    for (; j < n; ++j) {                                                              \
      const double g = static_cast<double>(dy[j]);                                    \
      s[0] = s[0] + g * static_cast<double>(x[j]);                                    \
      b[0] = b[0] + g;                                                                \
    }                                                                                 \
    *ds = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));          \
    *db = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));          \
  }                                                                                   \
  DPSEG_GN_CLONES void plane_dx(const T* dy, const T* x, int64_t n, T k1, T k2, T k3, \
                                T* dx) {                                              \
    for (int64_t j = 0; j < n; ++j) dx[j] = k1 * dy[j] + k2 * x[j] + k3;              \
  }
DPSEG_PLANE_SUMS(float)
DPSEG_PLANE_SUMS(double)
#undef DPSEG_PLANE_SUMS

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_per_sample_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight, int64_t groups,
    bool input_grad) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_backward_per_sample: x must be (N, C, ...), got ",
              x.sizes());
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "group_norm_backward_per_sample: grad_out ",
              grad_out.sizes(), " and x ", x.sizes(), " differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "group_norm_backward_per_sample: float32 or float64 inputs, got ", x.scalar_type());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
              "group_norm_backward_per_sample: grad_out and x dtypes differ");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_backward_per_sample: ", C,
              " channels do not split into ", groups, " groups");
  TORCH_CHECK(mean.numel() == N * groups && rstd.numel() == N * groups,
              "group_norm_backward_per_sample: mean and rstd must have N * groups = ",
              N * groups, " elements");
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == C, "group_norm_backward_per_sample: weight must have ", C,
                " elements");
  }
  const int64_t HxW = N * C == 0 ? 0 : x.numel() / (N * C);
  const int64_t D = C / groups;
  const at::Tensor dy_c = grad_out.contiguous(), x_c = x.contiguous();
  const at::Tensor mean_d = mean.reshape({N * groups}).to(at::kDouble).contiguous();
  const at::Tensor rstd_d = rstd.reshape({N * groups}).to(at::kDouble).contiguous();
  const at::Tensor gamma =
      weight.has_value() ? weight->reshape({C}).to(at::kDouble).contiguous()
                         : at::ones({C}, x.options().dtype(at::kDouble));
  at::Tensor ds = at::empty({N, C}, x.options().dtype(at::kDouble));
  at::Tensor db = at::empty({N, C}, x.options().dtype(at::kDouble));
  at::Tensor dx = input_grad ? at::empty_like(x_c) : at::empty({0}, x.options());
  if (N * C == 0) {
    return {dx, at::zeros({N, C}, x.options()), at::zeros({N, C}, x.options())};
  }

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_backward_per_sample", [&] {
    const scalar_t* dyp = dy_c.const_data_ptr<scalar_t>();
    const scalar_t* xp = x_c.const_data_ptr<scalar_t>();
    double* dsp = ds.data_ptr<double>();
    double* dbp = db.data_ptr<double>();
    // Pass 1: one (n, c) plane per task; a plane of 64^3 floats is 1 MiB of each input.
    at::parallel_for(0, N * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) plane_sums(dyp + i * HxW, xp + i * HxW, HxW, dsp + i, dbp + i);
    });
    if (!input_grad) return;
    const double* mp = mean_d.const_data_ptr<double>();
    const double* rp = rstd_d.const_data_ptr<double>();
    const double* gp = gamma.const_data_ptr<double>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const double inv_m = 1.0 / static_cast<double>(D * HxW);
    // Pass 2: the group's coefficients (D multiply-adds, recomputed per plane: cheaper than
    // a third parallel region), then the plane.
    at::parallel_for(0, N * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t n = i / C, c = i % C, g = c / D, ng = n * groups + g;
        double ds_g = 0.0, db_g = 0.0;
        for (int64_t k = g * D; k < (g + 1) * D; ++k) {
          ds_g = ds_g + dsp[n * C + k] * gp[k];
          db_g = db_g + dbp[n * C + k] * gp[k];
        }
        const double r = rp[ng], mu = mp[ng];
        const double c1 = r * gp[c];
        const double c2 = (db_g * mu - ds_g) * r * r * r * inv_m;
        const double c3 = -c2 * mu - db_g * r * inv_m;
        // The plane in scalar_t, as ATen does (opmath float for float): vectorises fully.
        const scalar_t k1 = static_cast<scalar_t>(c1), k2 = static_cast<scalar_t>(c2),
                       k3 = static_cast<scalar_t>(c3);
        plane_dx(dyp + i * HxW, xp + i * HxW, HxW, k1, k2, k3, dxp + i * HxW);
      }
    });
  });
  const at::Tensor mean_c = mean_d.view({N, groups, 1}).expand({N, groups, D}).reshape({N, C});
  const at::Tensor rstd_c = rstd_d.view({N, groups, 1}).expand({N, groups, D}).reshape({N, C});
  at::Tensor dgamma = ((ds - db * mean_c) * rstd_c).to(x.scalar_type());
  return {input_grad ? dx.view(x.sizes()) : dx, dgamma, db.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dpseg, CPU, m) {
  m.impl("group_norm_backward_per_sample", &group_norm_backward_per_sample_cpu);
}
