// quantized_multi_linear: one affine-quantized matrix per head, y[..., h, :, :] =
// x[..., h, :, :] * dequant(W[h])^T (what mx.quantized_matmul(..., transpose=True)
// computes on a (H, N, K) weight, mlx-lm's QuantizedMultiLinear: the MLA per-head
// up-projections embed_q / unembed_out), float32 accumulation. CPU: the weight-streaming
// row kernels of quantized_linear's decode GEMV over (head, chunk of rows), each weight
// byte read once per call. GPU streams call MLX's own quantized_matmul.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// x (..., H, M, K) float32/float16/bfloat16; w (H, N, K*bits/32) uint32; scales, biases
// (H, N, K/group_size) of one float dtype. Returns (..., H, M, N) in x's dtype.
mx::array quantized_multi_linear(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// inputs: x (..., H, M, K) of any strides, w, scales, biases -> y (..., H, M, N) in x's dtype
class QuantizedMultiLinear : public mx::UnaryPrimitive {
 public:
  QuantizedMultiLinear(mx::Stream stream, int bits, int group_size)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantQuantizedMultiLinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int bits_;
  int group_size_;
};

} // namespace moequant
