// dpseg::cpu::philox_noise_block (csrc/cpu/philox_cpu.cpp, vectorised, many blocks at a time)
// against the scalar dpseg::philox_noise of csrc/philox.h, bit for bit, over ranges of either
// parity, several draws and a large offset. Built and run by tests/test_ops_philox.py, once
// with the per-target versions and once with the portable path alone.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "philox.h"

int main() {
  long bad = 0, checked = 0;
  for (int64_t draws : {1, 2, 3, 4, 7}) {
    for (uint64_t e0 : {0ull, 1ull, 12345ull, (1ull << 40) + 3}) {
      const int64_t n = 20011;
      std::vector<double> out(n);
      dpseg::cpu::philox_noise_block(0xDEADBEEFCAFEull, 77, e0, n, draws, out.data());
      const double root = std::sqrt(static_cast<double>(draws));
      for (int64_t j = 0; j < n; ++j, ++checked) {
        const double want = dpseg::philox_noise(0xDEADBEEFCAFEull, 77, e0 + j, draws, root);
        if (std::memcmp(&want, &out[j], sizeof(double)) != 0 && bad++ < 5) {
          std::printf("draws %lld e0 %llu j %lld: %a != %a\n", static_cast<long long>(draws),
                      static_cast<unsigned long long>(e0), static_cast<long long>(j), out[j], want);
        }
      }
    }
  }
  std::printf("%ld of %ld differ\n", bad, checked);
  return bad == 0 ? 0 : 1;
}
