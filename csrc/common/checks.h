// Helpers for the op builders' argument checks and their error messages.
#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "common/quant_formats.h"
#include "mlx/array.h"
#include "mlx/ops.h"

namespace moequant {

inline std::string shape_str(const mlx::core::Shape& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    os << (i ? ", " : "") << s[i];
  }
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

inline std::string dtype_str(mlx::core::Dtype t) {
  std::ostringstream os;
  os << t;
  return os.str();
}

inline bool is_float(mlx::core::Dtype t) {
  return t == mlx::core::float32 || t == mlx::core::float16 || t == mlx::core::bfloat16;
}

// The groups one GPU launch of a quantizer covers, rows x groups_per_row: a uint32 in
// the kernels, so a larger call is refused (with the op's name) rather than wrapped.
inline uint32_t gpu_group_count(const char* op, size_t rows, uint32_t groups_per_row) {
  const size_t total = rows * size_t(groups_per_row);
  if (total > std::numeric_limits<uint32_t>::max()) {
    throw std::runtime_error(
        std::string("[moequant.") + op +
        "] more than 2^32 groups in one call on the GPU; split the tensor.");
  }
  return static_cast<uint32_t>(total);
}

// An op's input as a row-contiguous array of `shape`: `a` itself when it already is one
// (an evaluated weight), else MLX's reshape and contiguous (copying at eval time only if
// needed). Every node less counts at decode: an MLX CPU primitive costs ~8 us to run on
// this kind of host even when it moves no data (bench/RESULTS.md, issue 15 session 4).
inline mlx::core::array contiguous_as(
    const mlx::core::array& a,
    const mlx::core::Shape& shape,
    mlx::core::StreamOrDevice s) {
  if (a.shape() == shape && a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mlx::core::contiguous(mlx::core::reshape(a, shape, s), false, s);
}

} // namespace moequant
