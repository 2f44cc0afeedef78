// Helpers for the op builders' argument checks and their error messages.
#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "common/quant_formats.h"
#include "mlx/array.h"

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

} // namespace moequant
