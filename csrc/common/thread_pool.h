// A small persistent thread pool for the CPU kernels.
//
// Kernels run inside MLX's CPU stream worker; spawning threads per call would cost
// tens of microseconds, which matters for decode-time ops called per layer. The pool
// keeps its workers parked on a condition variable between calls.
#pragma once

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

} // namespace moequant
