// CPU kernels of moe_swiglu: phase A (gate + up + SwiGLU) and phase B (down, scores,
// reduction over the k experts). Multi-threaded with moequant::parallel_for.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "mlx/dtype.h"

namespace moequant::cpu {

// One stacked-expert quantized matrix: experts x rows x cols, MLX affine layout.
struct QMat {
  const uint8_t* w; // experts x rows x cols*bits/8 bytes
  const void* scales; // experts x rows x cols/group_size, dtype sdtype
  const void* biases; // same shape and dtype as scales
  mlx::core::Dtype sdtype = mlx::core::float32;
  int bits = 4;
  int group_size = 64;
  int experts = 0;
  int rows = 0;
  int cols = 0;
};

struct GateUpArgs {
  const void* x; // T x D, dtype xdtype
  mlx::core::Dtype xdtype = mlx::core::float32;
  const uint32_t* idx; // T x k expert ids
  std::size_t T = 0;
  int k = 0;
  QMat gate; // rows = I, cols = D
  QMat up; // rows = I, cols = D
  float* h; // T x k x I
};

struct DownArgs {
  const float* h; // T x k x I
  const uint32_t* idx; // T x k
  const float* scores; // T x k
  std::size_t T = 0;
  int k = 0;
  QMat down; // rows = D, cols = I
  void* y; // T x D, dtype ydtype
  mlx::core::Dtype ydtype = mlx::core::float32;
};

// moe_prefill: y (T x D, x's dtype) from x, the expert ids and scores, all three
// projections.
struct PrefillArgs {
  const void* x; // T x D, dtype xdtype
  mlx::core::Dtype xdtype = mlx::core::float32;
  const uint32_t* idx; // T x k
  const float* scores; // T x k
  std::size_t T = 0;
  int k = 0;
  QMat gate; // rows = I, cols = D
  QMat up; // rows = I, cols = D
  QMat down; // rows = D, cols = I
  void* y; // T x D, dtype xdtype
};

void moe_gate_up(const GateUpArgs& args);
void moe_down(const DownArgs& args);
void moe_prefill(const PrefillArgs& args); // moe_prefill_cpu.cpp

// Out-of-range expert ids, one behaviour on every backend (a Metal kernel cannot
// raise): never read; the output row of each token with such an id is NaN, the other
// tokens are exact. The ids are data, seen only when the kernels run.
class SafeIds {
 public:
  // idx: T x k ids; an id >= experts (64-bit ids outside 32 bits arrive as 0xFFFFFFFF).
  SafeIds(const uint32_t* idx, std::size_t T, int k, int experts);
  // The ids to compute with: idx itself, or a copy with each bad id replaced by expert 0
  // (its result is discarded).
  const uint32_t* ids() const {
    return copy_.empty() ? idx_ : copy_.data();
  }
  // Overwrites the rows (of `cols` values of dtype) of the tokens with a bad id with NaN.
  void nan_rows(std::size_t cols, mlx::core::Dtype dtype, void* y) const;

 private:
  const uint32_t* idx_;
  std::vector<uint32_t> copy_;
  std::vector<std::size_t> bad_tokens_;
};

// x's dtype <-> float32.
void load_floats(const void* src, mlx::core::Dtype dtype, std::size_t n, float* dst);
void store_floats(const float* src, std::size_t n, mlx::core::Dtype dtype, void* dst);

inline float silu(float g) {
  return g / (1.0f + std::exp(-g));
}

// The row kernels on dense matrices, one per head (the m.experts matrices of m), for
// quantized_linear's decode GEMV and quantized_multi_linear: x (B, H, T, m.cols) float32,
// y (B, H, T, m.rows), y[b, h, t, r] = row r of matrix h . x[b, h, t]; each weight byte
// streamed from memory once (the B * T vectors of a head reuse a chunk of rows from L2).
// Multi-threaded over (head, chunk of rows). `act` is the activations' dtype before their
// conversion to float32: the integer kernels keep x at its precision (moe_rows.h).
void multi_rows(
    const float* x,
    std::size_t B,
    std::size_t T,
    const QMat& m,
    float* y,
    mlx::core::Dtype act = mlx::core::float32);

// One matrix (m.experts == 1): y[t * m.rows + r] = row r . x[t] for t < T.
inline void dense_rows(
    const float* x,
    std::size_t T,
    const QMat& m,
    float* y,
    mlx::core::Dtype act = mlx::core::float32) {
  multi_rows(x, 1, T, m, y, act);
}

// The row kernels this build and CPU run, capped by MOEQUANT_CPU_PATH: "avx512vnni",
// "avx512", "avx2int", "avx2" or "scalar".
const char* moe_cpu_path();

} // namespace moequant::cpu
