// matmul_nt: y = a * b^T in float32, batched, on the CPU with the quantized GEMM's
// register-blocked micro-kernel (csrc/qgemm) on float rows. MLX's CPU matmul calls the
// reference BLAS that mlx[cpu] bundles on Linux (about 1 GFLOP/s on this project's
// machines); the MLA attention's float32 products (scores, probabilities x values,
// latent x up-projections) need a real GEMM. GPU streams call mx::matmul.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// a (..., M, K), b (..., N, K) float32 with the same leading dimensions -> (..., M, N)
// float32: y[..., m, n] = sum_k a[..., m, k] * b[..., n, k].
mx::array matmul_nt(const mx::array& a, const mx::array& b, mx::StreamOrDevice s = {});

namespace cpu {
// The op's CPU product on row-contiguous float32 data, for primitives that run it inside
// their own task (mla_decode_core): a (batch, M, K), b (batch, N, K) -> y (batch, M, N).
void matmul_nt(
    const float* a,
    const float* b,
    float* y,
    int64_t batch,
    int64_t M,
    int64_t N,
    int64_t K);
} // namespace cpu

// inputs: a (..., M, K), b (..., N, K) any strides -> y (..., M, N) row-contiguous
class MatmulNT : public mx::UnaryPrimitive {
 public:
  explicit MatmulNT(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantMatmulNT";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

} // namespace moequant
