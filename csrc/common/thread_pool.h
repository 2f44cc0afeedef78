// A small persistent thread pool for the CPU kernels.
//
// Kernels run inside MLX's CPU stream worker; spawning threads per call would cost
// tens of microseconds, which matters for decode-time ops called per layer. The pool
// keeps its workers between calls, spinning while calls come back to back, else parked
// on a condition variable (thread_pool.cpp).
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

// The items of the next parallel_for on this thread, for MOEQUANT_POOL_TRACE only.
void note_job_items(std::size_t n);

// Work items [0, n) claimed from a shared counter, at least `min_grain` and about an
// eighth of each thread's share at a time: a thread that the OS deschedules (the
// machine may be shared) delays only the items it holds, and each claim is a long run
// of consecutive items (claims of 8 row chunks made 3-bit Kimi layers ~5 % slower on a
// 2-core VM than long runs). fn(claim) runs once per thread; claim(body) calls
// body(begin, end) for each claimed range, so fn can set up per-thread scratch first.
template <typename F>
void dynamic_for(std::size_t n, std::size_t min_grain, F&& fn) {
  std::atomic<std::size_t> next{0};
  const std::size_t threads = static_cast<std::size_t>(get_num_threads());
  const std::size_t grain = std::max(min_grain, n / (threads * 8));
  const std::size_t tasks = std::min(threads, (n + grain - 1) / grain);
  note_job_items(n);
  parallel_for(tasks, 1, [&](std::size_t, std::size_t) {
    fn([&](auto&& body) {
      for (;;) {
        const std::size_t b = next.fetch_add(grain);
        if (b >= n) {
          break;
        }
        body(b, std::min(n, b + grain));
      }
    });
  });
}

} // namespace moequant
