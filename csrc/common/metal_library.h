// Where moequant's precompiled metallib lives, and its name.
#pragma once

#include <string>

#ifndef MOEQUANT_METALLIB_NAME
#define MOEQUANT_METALLIB_NAME "moequant_kernels"
#endif
// Written next to the extension by the build instead of the metallib when
// MOEQUANT_METAL=auto and the Metal compiler failed (cmake/build_metallib.cmake).
#define MOEQUANT_METAL_ERROR_FILE "moequant_metal_error.txt"

namespace moequant {

// The directory of this extension module (the metallib is installed next to it), found
// with dladdr on one of our own symbols wherever the package was installed.
std::string extension_dir();

} // namespace moequant

#ifdef _METAL_
#include "mlx/backend/metal/device.h"

namespace moequant {

// The metallib for code that talks to MLX's Metal device directly (new host code should
// use KernelEncoder, common/kernel_encoder.h). MLX caches libraries by name for the
// process; the name is unique to moequant.
inline MTL::Library* metal_library(mlx::core::metal::Device& d) {
  return d.get_library(MOEQUANT_METALLIB_NAME, extension_dir());
}

} // namespace moequant
#endif
