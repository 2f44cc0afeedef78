// A small persistent thread pool for the CPU kernels.
//
// Kernels run inside MLX's CPU stream worker; spawning threads per call would cost
// tens of microseconds, which matters for decode-time ops called per layer. The pool
// keeps its workers parked on a condition variable between calls.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <functional>

namespace moequant {

// Number of threads parallel_for uses (including the calling thread).
// Defaults to MOEQUANT_NUM_THREADS if set, else the available cores.
int get_num_threads();
// n <= 0 restores the default.
void set_num_threads(int n);

// Runs fn(begin, end) over [0, n) split into contiguous chunks of at least
// `min_chunk` items, on up to get_num_threads() threads; returns when all are done.
// The first exception thrown by fn is rethrown on the calling thread.
void parallel_for(
    std::size_t n,
    std::size_t min_chunk,
    const std::function<void(std::size_t, std::size_t)>& fn);

// Work items [0, n) claimed from a shared counter, guided: each claim takes a
// 1 / (2 * threads) share of the items still left, at least `min_grain`. A claim is a
// long run of consecutive items while much is left (claims of 8 row chunks made 3-bit
// Kimi layers ~5 % slower on a 2-core VM than long runs), and the last claims are
// short, so the thread that finishes first waits little for the other's last claim (with
// fixed claims of 1/16 of a job, a 76 ms Kimi-pair decode token had ~3.8 ms with one
// core alone in the row kernels, perf profile in bench/RESULTS.md); a
// thread that the OS deschedules (the machine may be shared) delays only the items it
// holds. fn(claim) runs once per thread; claim(body) calls body(begin, end) for each
// claimed range, so fn can set up per-thread scratch first.
template <typename F>
void dynamic_for(std::size_t n, std::size_t min_grain, F&& fn) {
  std::atomic<std::size_t> next{0};
  const std::size_t threads = static_cast<std::size_t>(get_num_threads());
  min_grain = std::max<std::size_t>(min_grain, 1);
  const std::size_t tasks = std::min(threads, (n + min_grain - 1) / min_grain);
  parallel_for(tasks, 1, [&](std::size_t, std::size_t) {
    fn([&](auto&& body) {
      std::size_t b = next.load(std::memory_order_relaxed);
      while (b < n) {
        const std::size_t g = std::max(min_grain, (n - b) / (2 * threads));
        if (next.compare_exchange_weak(b, b + g, std::memory_order_relaxed)) {
          body(b, std::min(n, b + g));
          b = next.load(std::memory_order_relaxed);
        }
      }
    });
  });
}

} // namespace moequant
