// A memory read-bandwidth probe for the benchmarks, so that every speed figure can be
// put next to what this machine's memory delivers in the same run.
#pragma once

#include <cstddef>

namespace moequant {

// Reads a buffer of `bytes` bytes `iters` times on get_num_threads() threads
// (each thread its own contiguous slice) and returns the best GB/s (1e9 bytes/s).
double read_bandwidth_gbs(std::size_t bytes, int iters);

} // namespace moequant
