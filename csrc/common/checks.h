// Helpers for the op builders' argument checks and their error messages.
#pragma once

#include <sstream>
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

} // namespace moequant
