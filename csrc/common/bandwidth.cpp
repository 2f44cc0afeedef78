#include "common/bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/thread_pool.h"

namespace moequant {

double read_bandwidth_gbs(std::size_t bytes, int iters) {
  if (bytes < (1 << 20) || iters < 1) {
    throw std::invalid_argument("read_bandwidth_gbs: need bytes >= 1 MiB and iters >= 1");
  }
  std::size_t n = bytes / sizeof(uint64_t);
  std::vector<uint64_t> buf(n);
  for (std::size_t i = 0; i < n; ++i) {
    buf[i] = i; // touch every page so the timing sees no page faults
  }
  double best = 0.0;
  volatile uint64_t sink = 0;
  for (int it = 0; it < iters; ++it) {
    auto t0 = std::chrono::steady_clock::now();
    parallel_for(n, 1 << 16, [&](std::size_t b, std::size_t e) {
      // Four independent XOR chains: vectorizes and never waits on the adder.
      uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      std::size_t i = b;
      for (; i + 4 <= e; i += 4) {
        a0 ^= buf[i];
        a1 ^= buf[i + 1];
        a2 ^= buf[i + 2];
        a3 ^= buf[i + 3];
      }
      for (; i < e; ++i) {
        a0 ^= buf[i];
      }
      sink = sink ^ (a0 ^ a1 ^ a2 ^ a3);
    });
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(n * sizeof(uint64_t)) / s / 1e9);
  }
  return best;
}

} // namespace moequant
