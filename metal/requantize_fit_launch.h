// Launch contract of the mse-fit Metal kernels (metal/requantize_fit.metal), the one
// definition shared by the kernels, the host dispatch (RequantizeFit::encode in
// csrc/requantize/requantize_mse.cpp) and therefore the emulator tests, which execute
// that host dispatch. Plain macros: the same text is valid MSL and C++.
#pragma once

// One thread per output group; 1-D threadgroups of MQ_FIT_THREADS threads (each thread
// holds ~3.7 KB of per-group arrays, so fewer than requantize_int4's), grid
// (ceil(n_groups / MQ_FIT_THREADS), 1, 1); threads past n_groups return at once.
#define MQ_FIT_THREADS 64

// Buffers of requantize_fit_int4: packed INT4 words, their scales, importance (K floats).
#define MQ_FIT_PACKED 0
#define MQ_FIT_SRC_SCALES 1
#define MQ_FIT_INT4_IMPORTANCE 2
// Buffers of quantize_fit: the float weights and importance (slot 2 unused).
#define MQ_FIT_W 0
#define MQ_FIT_FLOAT_IMPORTANCE 1
// Outputs and constants, the same for both kernels.
#define MQ_FIT_WQ 3
#define MQ_FIT_SCALES 4
#define MQ_FIT_BIASES 5
#define MQ_FIT_N_GROUPS 6
#define MQ_FIT_GROUPS_PER_ROW 7
#define MQ_FIT_BITS 8
#define MQ_FIT_GROUP_SIZE 9
#define MQ_FIT_SRC_GROUP_SIZE 10

// requantize_fit_int4_<source scales dtype>_<output dtype> and
// quantize_fit_<weights dtype>_<output dtype>, dtype names as MLX spells them.
#define MQ_FIT_INT4_NAME(sname, oname) "requantize_fit_int4_" #sname "_" #oname
#define MQ_FIT_FLOAT_NAME(sname, oname) "quantize_fit_" #sname "_" #oname

#ifndef __METAL_VERSION__
#include <string>

namespace moequant::launch {

inline std::string fit_kernel_name(bool int4, const std::string& src, const std::string& out) {
  return (int4 ? "requantize_fit_int4_" : "quantize_fit_") + src + "_" + out;
}

} // namespace moequant::launch
#endif
