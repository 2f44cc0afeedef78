// Reading an input of any strides inside a primitive's task: an op that takes a view
// (a slice, a transpose) as it is saves the graph its Reshape / Contiguous nodes (each
// ~8 us at decode on this project's hosts) and copies, when it must, at eval time.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "mlx/array.h"

namespace moequant {

// Memory offset (in elements) of row r of `a` viewed as (size / D, D), D = a.shape(-1):
// the rows are the index tuples of every axis but the last, in row-major order.
inline int64_t row_offset(const mlx::core::array& a, int64_t r) {
  int64_t off = 0;
  for (int k = static_cast<int>(a.ndim()) - 2; k >= 0; --k) {
    const int64_t n = a.shape(k);
    off += (r % n) * a.strides()[k];
    r /= n;
  }
  return off;
}

// Copies `a` (any strides, evaluated) into dst as row-contiguous (size / D, D) data.
inline void copy_row_contiguous(const mlx::core::array& a, void* dst) {
  const int64_t D = a.ndim() ? a.shape(-1) : 1;
  const int64_t rows = D ? static_cast<int64_t>(a.size()) / D : 0;
  const int64_t sd = a.ndim() ? a.strides().back() : 1;
  const std::size_t item = a.itemsize();
  const char* src = static_cast<const char*>(a.data<void>());
  char* out = static_cast<char*>(dst);
  for (int64_t r = 0; r < rows; ++r) {
    const char* s = src + row_offset(a, r) * static_cast<int64_t>(item);
    char* d = out + r * D * static_cast<int64_t>(item);
    if (sd == 1) {
      std::memcpy(d, s, D * item);
    } else {
      for (int64_t j = 0; j < D; ++j) {
        std::memcpy(d + j * item, s + j * sd * static_cast<int64_t>(item), item);
      }
    }
  }
}

// Runs f(rows) with x's (size / D, D) rows row-contiguous: x's own data when x is
// row-contiguous, else a copy made here, so call it inside the task (after x's producer
// has written x). The copy lives until f returns.
template <typename F>
decltype(auto) with_rows(const mlx::core::array& x, F&& f) {
  if (x.flags().row_contiguous) {
    return f(static_cast<const void*>(x.data<void>()));
  }
  std::vector<char> rows(x.size() * x.itemsize());
  copy_row_contiguous(x, rows.data());
  return f(static_cast<const void*>(rows.data()));
}

} // namespace moequant
