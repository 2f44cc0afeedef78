// Quantized GEMM core for the CPU: y = x * dequant(W)^T with W in MLX's affine layout
// (transpose=True), float32 accumulation. Shared by quantized_linear (dense layers)
// and the MoE prefill (one call per expert over its tokens).
//
// Scheme: x is packed once into blocks of kRowBlock rows, K-major (a vector load gives
// one k of 16 rows); W is decoded tile by tile (a few rows x a K chunk) into a float
// buffer that stays in L2 and is reused across every row block of x; a register-blocked
// micro-kernel (AVX2/FMA when the CPU has it, a portable one otherwise, capped by
// MOEQUANT_CPU_PATH like the row kernels) multiplies them. Every weight is decoded once
// per call per kMaxRows rows of x.
//
// Single-threaded: callers thread over (matrix, row range of W) and, for long x, over
// row-block ranges of x; the prepared Activations are read-only and shared.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "mlx/dtype.h"
#include "qgemm/qgemm_kernels.h"

namespace moequant::qgemm {

// One affine-quantized matrix: N rows of K codes, each row packed little-endian along
// K in uint32 words (K * bits / 32 per row); scales and biases (N, K / group_size) of
// dtype sb_dtype (float32, float16 or bfloat16). bits 2/3/4/5/6/8, group 32/64/128.
struct QuantWeight {
  const uint32_t* w = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr;
  mlx::core::Dtype sb_dtype = mlx::core::float32;
  int bits = 4;
  int group_size = 64;
  int64_t N = 0;
  int64_t K = 0;
};

// x (M, K), converted to float32 and packed once. Row m is read at x + r * ldx elements,
// r = rows ? rows[m] : m (rows gathers e.g. the tokens routed to one expert). dtype is
// float32, float16 or bfloat16.
class Activations {
 public:
  Activations(
      const void* x,
      mlx::core::Dtype dtype,
      int64_t M,
      int64_t ldx,
      int64_t K,
      const int64_t* rows = nullptr);
  int64_t M() const {
    return M_;
  }
  int64_t K() const {
    return K_;
  }
  // Block b: K x kRowBlock floats, element (k, i) = x[b * kRowBlock + i, k], zero past M.
  const float* block(int64_t b) const {
    return data_.get() + static_cast<std::size_t>(b) * K_ * kRowBlock;
  }

 private:
  struct Free {
    void operator()(float* p) const;
  };
  int64_t M_;
  int64_t K_;
  std::unique_ptr<float, Free> data_;
};

// y[(m - m0) * ldy + (n - n0)] = sum_k x[m, k] * dequant(W)[n, k] for m in [m0, m1)
// and n in [n0, n1), dequant(W)[n, k] = scale * q + bias of k's group. m1 < 0 means
// x.M(); m0 must be a multiple of kRowBlock. Throws std::invalid_argument on
// inconsistent arguments.
void gemm(
    const Activations& x,
    const QuantWeight& W,
    int64_t n0,
    int64_t n1,
    float* y,
    int64_t ldy,
    int64_t m0 = 0,
    int64_t m1 = -1);

// Convenience: packs x (float32, M rows of stride ldx) and runs gemm on all its rows.
void gemm(
    const float* x,
    int64_t M,
    int64_t ldx,
    const QuantWeight& W,
    int64_t n0,
    int64_t n1,
    float* y,
    int64_t ldy);

// FMA peak of this machine in GFLOP/s: every thread of the pool (get_num_threads())
// runs independent 8-lane FMA chains for about `seconds` (AVX2 path; 0 on others).
double fma_peak_gflops(double seconds);

// The micro-kernels gemm uses now, for float rows that need no decoding (the dense
// float32 GEMM of csrc/dense_gemm).
detail::Kernels micro_kernels();

// "avx2" or "scalar": the micro-kernel gemm uses now (MOEQUANT_CPU_PATH caps it).
const char* gemm_path();

} // namespace moequant::qgemm
