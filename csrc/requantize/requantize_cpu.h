// CPU kernel: compressed-tensors INT4 rows -> MLX affine rows (codes, scales, biases).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mlx/dtype.h"

namespace moequant::cpu {

struct RequantizeArgs {
  const uint8_t* packed; // rows x K/2 bytes (eight nibbles per int32 word, low first)
  const void* src_scales; // rows x K/src_group_size, dtype src_dtype
  uint8_t* wq; // rows x K*bits/8 bytes
  void* scales; // rows x K/group_size, dtype out_dtype
  void* biases; // rows x K/group_size, dtype out_dtype
  std::size_t rows;
  int K;
  int bits;
  int group_size;
  int src_group_size;
  mlx::core::Dtype src_dtype = mlx::core::float32;
  mlx::core::Dtype out_dtype = mlx::core::float32;
};

// Multi-threaded over rows (see common/thread_pool.h for the thread count).
void requantize_int4(const RequantizeArgs& args);

struct QuantizeArgs {
  const void* w; // rows x K, dtype w_dtype
  uint8_t* wq; // rows x K*bits/8 bytes
  void* scales; // rows x K/group_size, dtype w_dtype
  void* biases; // rows x K/group_size, dtype w_dtype
  std::size_t rows;
  int K;
  int bits;
  int group_size;
  mlx::core::Dtype w_dtype = mlx::core::float32;
};

// mx.quantize's affine min-max quantization on the CPU, bit for bit (the same float32
// arithmetic per group: requantize_int4's parameters, codes and packing), multi-threaded
// over rows and vectorized; MLX's own CPU kernel is one scalar thread.
void quantize_minmax(const QuantizeArgs& args);

// True when this build and this CPU run the SIMD (pshufb / tbl) path.
bool requantize_simd_available();

// False only for an x86-64 build (compiled with SSSE3) on a CPU without SSSE3.
bool requantize_cpu_supported();

} // namespace moequant::cpu
