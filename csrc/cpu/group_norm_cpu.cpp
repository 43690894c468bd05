// Fused per-sample GroupNorm backward: grad_input and each sample's dgamma, dbeta from one
// read of (grad_out, x) for the channel sums and one more for grad_input, as ATen's own
// backward does (aten/src/ATen/native/cpu/group_norm_kernel.cpp) -- it then sums dgamma and
// dbeta over the batch, and this op simply does not.
//
// With dc[n,c] = sum_s dy*(x - mean[n,g]) (centred), db[n,c] = sum_s dy, D = C/G channels per
// group, M = D*HxW:
//   dgamma[n,c] = dc[n,c] * rstd[n,g]        dbeta[n,c] = db[n,c]
//   dx = c1 * dy + c2 * x + c3   with  c1 = rstd * gamma[c],
//   c2 = -(sum_c dc*gamma) * rstd^3 / M,  c3 = -c2 * mean - (sum_c db*gamma) * rstd / M
// (ATen sums dy*x and subtracts db*mean afterwards: with a mean large against the spread that
// difference cancels, to a relative error of 8e-3 in dgamma at x = 100 + 0.01 randn in float;
// centred, nothing cancels.) The sums are in a fixed order: the same bits with any thread
// count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// Pass 1 over one plane: dc = sum dy*(x - mu), db = sum dy, in a fixed order (the same bits
// with any thread count). Doubles: eight lanes throughout. Floats: 32 float lanes over
// blocks of kBlock elements (64 products a lane), each block's lanes then added into double
// lanes. In cache, a double conversion per element made this twice ATen's time (float
// lanes, 2x16x24^3 hot: 0.34 against 0.17 ms); the blocks keep float's speed, and a lane's
// 64 float additions of centred products err by ~64 ulp of their own size.
DPSEG_GN_CLONES void plane_sums(const double* dy, const double* x, int64_t n, double mu,
                                double* dc, double* db) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) {
      s[k] = s[k] + dy[j + k] * (x[j + k] - mu);
      b[k] = b[k] + dy[j + k];
    }
  }
  for (; j < n; ++j) {
    s[0] = s[0] + dy[j] * (x[j] - mu);
    b[0] = b[0] + dy[j];
  }
  *dc = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  *db = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
}

constexpr int kLanes = 32;
constexpr int64_t kBlock = 64 * kLanes;

// mu comes in double; the float lanes centre on its float rounding mu_f and the double
// total adds back (mu_f - mu) * db, so dc is centred on mu itself. (native_group_norm's
// float mean is exactly a float: the correction is then 0.)
DPSEG_GN_CLONES void plane_sums(const float* dy, const float* x, int64_t n, double mu,
                                double* dc, double* db) {
  const float mu_f = static_cast<float>(mu);
  double S[kLanes], B[kLanes];
  for (int k = 0; k < kLanes; ++k) S[k] = B[k] = 0.0;
  int64_t j = 0;
  while (j + kLanes <= n) {
    const int64_t stop = std::min(n, j + kBlock);
    float s[kLanes], b[kLanes];
    for (int k = 0; k < kLanes; ++k) s[k] = b[k] = 0.0f;
    for (; j + kLanes <= stop; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        s[k] = s[k] + dy[j + k] * (x[j + k] - mu_f);
        b[k] = b[k] + dy[j + k];
      }
    }
    for (int k = 0; k < kLanes; ++k) {
      S[k] = S[k] + static_cast<double>(s[k]);
      B[k] = B[k] + static_cast<double>(b[k]);
    }
  }
  for (; j < n; ++j) {
    const double g = static_cast<double>(dy[j]);
    S[0] = S[0] + g * (static_cast<double>(x[j]) - static_cast<double>(mu_f));
    B[0] = B[0] + g;
  }
  for (int w = kLanes / 2; w >= 1; w /= 2) {  // pairwise, in a fixed order
    for (int k = 0; k < w; ++k) {
      S[k] = S[k] + S[k + w];
      B[k] = B[k] + B[k + w];
    }
  }
  *dc = S[0] + (static_cast<double>(mu_f) - mu) * B[0];
  *db = B[0];
}

template <typename T>
DPSEG_GN_CLONES void plane_dx(const T* dy, const T* x, int64_t n, T k1, T k2, T k3, T* dx) {
  for (int64_t j = 0; j < n; ++j) dx[j] = k1 * dy[j] + k2 * x[j] + k3;
}

// One (sample, group): its planes' sums, the per-sample dgamma and dbeta, then (when
// ``dx``) the group's coefficients and its planes' input gradient. Run per group, the second
// pass re-reads a group that the first has just brought into cache (a group of 2 planes of
// 48^3 floats is 1.7 MiB of dy and x), instead of streaming the whole tensor twice.
template <typename T>
struct GroupNormBackward {
  const T *dy, *x;
  const double *mean, *rstd, *gamma;  // gamma: nullptr when the norm has no weight
  int64_t C, G, D, HxW;
  double *dc, *db;  // (N, C) plane sums: centred dy*x, and dy
  T *dgamma, *dbeta, *dx;

  void sums(int64_t plane) const {
    plane_sums(dy + plane * HxW, x + plane * HxW, HxW, mean[plane / C * G + plane % C / D],
               dc + plane, db + plane);
  }
  // dgamma = dc rstd, dbeta = db, for the planes of group (n, g).
  void params(int64_t n, int64_t g) const {
    const double r = rstd[n * G + g];
    for (int64_t i = n * C + g * D; i < n * C + (g + 1) * D; ++i) {
      dgamma[i] = static_cast<T>(dc[i] * r);
      dbeta[i] = static_cast<T>(db[i]);
    }
  }
  // dx = c1 dy + c2 x + c3 over plane (n, c); the group's coefficients are recomputed per
  // plane (D multiply-adds), so both schedules below run the same arithmetic.
  void input_grad(int64_t n, int64_t c) const {
    const int64_t g = c / D;
    double dc_g = 0.0, db_g = 0.0;
    for (int64_t k = g * D; k < (g + 1) * D; ++k) {
      const double gk = gamma ? gamma[k] : 1.0;
      dc_g = dc_g + dc[n * C + k] * gk;
      db_g = db_g + db[n * C + k] * gk;
    }
    const double r = rstd[n * G + g], mu = mean[n * G + g];
    const double inv_m = 1.0 / static_cast<double>(D * HxW);
    const double c1 = r * (gamma ? gamma[c] : 1.0);
    const double c2 = -dc_g * r * r * r * inv_m;
    const double c3 = -c2 * mu - db_g * r * inv_m;
    const int64_t plane = n * C + c;
    // The plane in T, as ATen does (opmath float for float): vectorises fully.
    plane_dx(dy + plane * HxW, x + plane * HxW, HxW, static_cast<T>(c1), static_cast<T>(c2),
             static_cast<T>(c3), dx + plane * HxW);
  }
};

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
  const int64_t G = groups, D = C / groups;
  at::Tensor dx = input_grad ? at::empty_like(x, at::MemoryFormat::Contiguous)
                             : at::empty({0}, x.options());
  at::Tensor dgamma = at::empty({N, C}, x.options());
  at::Tensor dbeta = at::empty({N, C}, x.options());
  if (N * C == 0) return {dx, dgamma.zero_(), dbeta.zero_()};
  const at::Tensor dy_c = grad_out.contiguous(), x_c = x.contiguous();
  // The statistics and gamma in double (one small buffer), and the plane sums.
  std::vector<double> stats(2 * N * G + C + 2 * N * C);
  double* mean_d = stats.data();
  double* rstd_d = mean_d + N * G;
  double* gamma_d = rstd_d + N * G;
  const at::Tensor mean_c = mean.reshape({N * G}).to(at::kDouble).contiguous();
  const at::Tensor rstd_c = rstd.reshape({N * G}).to(at::kDouble).contiguous();
  std::copy_n(mean_c.const_data_ptr<double>(), N * G, mean_d);
  std::copy_n(rstd_c.const_data_ptr<double>(), N * G, rstd_d);
  if (weight.has_value()) {
    const at::Tensor w = weight->reshape({C}).to(at::kDouble).contiguous();
    std::copy_n(w.const_data_ptr<double>(), C, gamma_d);
  }

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_backward_per_sample", [&] {
    const GroupNormBackward<scalar_t> op{
        dy_c.const_data_ptr<scalar_t>(), x_c.const_data_ptr<scalar_t>(), mean_d, rstd_d,
        weight.has_value() ? gamma_d : nullptr, C, G, D, HxW, gamma_d + C, gamma_d + C + N * C,
        dgamma.data_ptr<scalar_t>(), dbeta.data_ptr<scalar_t>(),
        input_grad ? dx.data_ptr<scalar_t>() : nullptr};
    const int64_t tasks = N * G, threads = at::get_num_threads();
    if (tasks % threads == 0 || tasks >= 4 * threads) {
      // Enough groups to share out: one parallel region, each group's two passes together.
      at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t t = lo; t < hi; ++t) {
          const int64_t n = t / G, g = t % G;
          for (int64_t plane = n * C + g * D; plane < n * C + (g + 1) * D; ++plane) op.sums(plane);
          op.params(n, g);
          if (!input_grad) continue;
          for (int64_t c = g * D; c < (g + 1) * D; ++c) op.input_grad(n, c);
        }
      });
      return;
    }
    // Few large groups (GroupNorm(1, C) on one sample, say): planes shared out, then groups.
    // The same sums and formulas in the same order: the same bits as the path above.
    at::parallel_for(0, N * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t plane = lo; plane < hi; ++plane) op.sums(plane);
    });
    for (int64_t t = 0; t < tasks; ++t) op.params(t / G, t % G);
    if (!input_grad) return;
    at::parallel_for(0, N * C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t plane = lo; plane < hi; ++plane) op.input_grad(plane / C, plane % C);
    });
  });
  return {input_grad ? dx.view(x.sizes()) : dx, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(dpseg, CPU, m) {
  m.impl("group_norm_backward_per_sample", &group_norm_backward_per_sample_cpu);
}
