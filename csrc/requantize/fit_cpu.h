// CPU kernels of the mse fit (fit="mse"): INT4 -> affine (requantize_int4) and float ->
// affine (quantize). The arithmetic is metal/requantize_fit.h; fit_rows.h turns rows
// into groups of slots for it. Paths: scalar (fit_cpu.cpp) and AVX2 (fit_avx2.cpp),
// bit-identical; MOEQUANT_CPU_PATH=scalar caps the path (tests, benchmarks).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mlx/dtype.h"

namespace moequant::fit {

struct FitArgs {
  const uint8_t* packed = nullptr; // INT4: rows x K/2 bytes (nibble u = q + 8)
  const void* src_scales = nullptr; // INT4: rows x K/src_group_size, src_dtype
  const void* w = nullptr; // float input: rows x K, src_dtype
  const float* importance = nullptr; // K weights or nullptr
  bool unit_importance = false; // importance all ones (or absent): set by fit_int4/fit_float
  uint8_t* wq = nullptr; // rows x K*bits/8 bytes
  void* scales = nullptr; // rows x K/group_size, out_dtype
  void* biases = nullptr;
  std::size_t rows = 0;
  int K = 0;
  int bits = 0;
  int group_size = 0;
  int src_group_size = 32;
  mlx::core::Dtype src_dtype = mlx::core::float32;
  mlx::core::Dtype out_dtype = mlx::core::float32;
};

// Multi-threaded over groups (common/thread_pool.h); the same bits for any thread count.
void fit_int4(const FitArgs& a);
void fit_float(const FitArgs& a);

// "avx2" or "scalar": the path the fit runs on now.
const char* fit_path();

// Group range [g0, g1) of all rows' groups, per path (internal).
void fit_groups_scalar(const FitArgs& a, bool int4, std::size_t g0, std::size_t g1);
void fit_groups_avx2(const FitArgs& a, bool int4, std::size_t g0, std::size_t g1);

} // namespace moequant::fit
