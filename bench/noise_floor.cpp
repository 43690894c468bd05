// The floor under dpseg's CPU noise: how much of a Gaussian's time is Philox alone.
//
// Issue 26 asks for noise at half of torch.randn's time per element "in plain and in secure
// mode alike". Secure mode (Opacus's) sums four normals per element, so its budget per
// normal is an eighth of randn's. This program splits the shipped generator
// (csrc/cpu/philox_cpu.cpp, included here so the same code is timed) into its two stages, on
// one thread:
//   1. Philox4x32-10 and the uniforms made from its words (one block = two normals);
//   2. Box-Muller from those uniforms: sqrt(-2 ln u1) and cos, sin of 2 pi u2 in double,
//      from IEEE-exact operations only (so every backend gives the same bits);
// and the whole path, plain (one normal per element) and secure (four, summed, over 2).
// No torch: it builds alone.
//
//   g++ -O3 -std=c++17 -ffp-contract=off -fno-math-errno -Icsrc bench/noise_floor.cpp \
//       -o /tmp/noise_floor && /tmp/noise_floor
#include "cpu/philox_cpu.cpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Stage 1 on this CPU's widest path, as normal_pairs would run it.
void uniforms(uint64_t q0, dpseg::cpu::Uniforms& u) {
  using namespace dpseg::cpu;
#if DPSEG_X86_VERSIONS
#if !defined(DPSEG_NO_AVX512)
  if (__builtin_cpu_supports("avx512f")) return philox_uniforms_avx512(42, 7, q0, kPairs, u);
#endif
  if (__builtin_cpu_supports("avx2")) return philox_uniforms_avx2(42, 7, q0, kPairs, u);
#endif
  philox_uniforms_generic(42, 7, q0, 0, kPairs, u);
}

}  // namespace

int main() {
  using namespace dpseg::cpu;
  constexpr int64_t n = int64_t{1} << 22;  // normals per timed run
  constexpr int kRuns = 9;
  std::vector<double> out(n);
  Uniforms u;
  double best_full = 1e9, best_secure = 1e9, best_philox = 1e9, sink = 0;
  for (int r = 0; r < kRuns; ++r) {
    double t = now();
    philox_noise_block(42, 7, 0, n, 1, out.data());
    best_full = std::min(best_full, now() - t);
    sink += out[n / 3];
    t = now();
    philox_noise_block(42, 7, 0, n / 4, 4, out.data());
    best_secure = std::min(best_secure, now() - t);
    sink += out[n / 5];
    t = now();
    for (int64_t q = 0; q < n / 2; q += kPairs) {
      uniforms(static_cast<uint64_t>(q), u);
      sink += u.u1[q % kPairs];
    }
    best_philox = std::min(best_philox, now() - t);
  }
  const double full = best_full / n * 1e9, philox = best_philox / n * 1e9;
  std::printf("one thread, ns per normal (best of %d runs of %lld normals):\n", kRuns,
              static_cast<long long>(n));
  std::printf("  Philox4x32-10 + uniforms  %.2f  (%.0f%%)\n", philox, 100 * philox / full);
  std::printf("  Box-Muller (the rest)     %.2f  (%.0f%%)\n", full - philox,
              100 * (full - philox) / full);
  std::printf("  whole generator, plain    %.2f\n", full);
  std::printf("secure mode, ns per element (four normals): %.2f; Philox alone in it: %.2f\n",
              best_secure / (n / 4) * 1e9, 4 * philox);
  return sink == 0.125 ? 1 : 0;  // keeps the work observable
}
