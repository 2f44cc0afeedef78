// Loading moequant's precompiled metallib (macOS builds only).
#pragma once

#ifdef _METAL_
#include <dlfcn.h>

#include <string>

#include "mlx/backend/metal/device.h"

#ifndef MOEQUANT_METALLIB_NAME
#define MOEQUANT_METALLIB_NAME "moequant_kernels"
#endif

namespace moequant {

// The metallib is installed next to this extension module; dladdr on one of our own
// symbols finds that directory wherever the package was installed.
inline std::string extension_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&extension_dir), &info) == 0 || !info.dli_fname) {
    return {};
  }
  std::string path(info.dli_fname);
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

inline MTL::Library* metal_library(mlx::core::metal::Device& d) {
  // MLX caches libraries by name for the process; the name is unique to moequant.
  return d.get_library(MOEQUANT_METALLIB_NAME, extension_dir());
}

} // namespace moequant
#endif
