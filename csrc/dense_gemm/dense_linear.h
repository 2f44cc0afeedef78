// dense_linear: y = x @ w.T for a float weight (N, K) (bf16, f16 or f32), the bits of
// MLX's CPU matmul on Linux: each output the sequential float32 sum over k of the
// float32-rounded products x[k] * w[n, k] (no fused multiply-add), then rounded to the
// result dtype (x's and w's promoted dtype, as `x @ w.T`). MLX computes it on one
// thread (its simd_gemm for bf16 / f16, the bundled BLAS after a float32 copy of the
// weight otherwise); MoE routers (DeepSeek-V3's 384 x 7168 bf16 gate) call it once per
// layer and token. Here the rows are split across the pool's threads and each output
// keeps its own sequential sum in one vector lane (eight rows per vector), so the
// result is MLX's whatever the thread count. GPU streams call mx::matmul.
#pragma once

#include <cstdint>
#include <type_traits>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// x (..., K) and w (N, K) of float dtypes -> (..., N) of their promoted dtype.
mx::array dense_linear(const mx::array& x, const mx::array& w, mx::StreamOrDevice s = {});

// inputs: x (..., K) any strides, w (N, K) any strides -> y (..., N) row-contiguous
class DenseLinear : public mx::UnaryPrimitive {
 public:
  explicit DenseLinear(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantDenseLinear";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

namespace dense_rows {

enum class WType { f32, f16, bf16 };

// f(std::integral_constant<WType, wt>{}): the kernels take the weight dtype as a template
// parameter, the switch runs once per tile.
template <typename F>
decltype(auto) with_wtype(WType wt, F&& f) {
  switch (wt) {
    case WType::bf16:
      return f(std::integral_constant<WType, WType::bf16>{});
    case WType::f16:
      return f(std::integral_constant<WType, WType::f16>{});
    default:
      return f(std::integral_constant<WType, WType::f32>{});
  }
}

// Rows per tile (a multiple of 8, the lanes of one AVX2 vector) and k per panel.
constexpr int kTileRows = 32;
constexpr int kPanelK = 256;

// One tile: y[m * ldy + (n - n0)] = sum_k x[m * K + k] * w[n * ldw + k] for m in [0, M),
// n in [n0, n1), n1 - n0 <= kTileRows; x float32 rows, y float32.
struct Tile {
  const float* x;
  int64_t M, K;
  const void* w;
  WType wt;
  int64_t ldw;
  int64_t n0, n1;
  float* y;
  int64_t ldy;
};

void tile_scalar(const Tile& t);
#if defined(__x86_64__) || defined(_M_X64)
void tile_avx2(const Tile& t); // dense_linear_avx2.cpp
#endif

} // namespace dense_rows

} // namespace moequant
