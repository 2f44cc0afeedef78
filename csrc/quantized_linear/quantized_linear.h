// quantized_linear: y = x * dequant(W)^T for one affine-quantized matrix (what
// mx.quantized_matmul(..., transpose=True) computes), float32 accumulation. CPU:
// a weight-streaming GEMV for a few rows, the quantized GEMM (csrc/qgemm) for more.
// GPU streams call MLX's own quantized_matmul.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// x (..., K) float32/float16/bfloat16; w (N, K*bits/32) uint32; scales, biases
// (N, K/group_size) of one float dtype. Returns (..., N) in x's dtype.
mx::array quantized_linear(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// The argument checks quantized_linear and quantized_multi_linear share: bits and group
// size, x / scales / biases float dtypes, w uint32 of shape lead + (N, K*bits/32) and
// scales, biases lead + (N, K/group_size), K = x's last axis. `op` prefixes the messages
// ("[moequant.<name>] "); `w_form` names w's shape in them ("(N, K*bits/32)"); each op
// checks its own ranks of x first. Throws std::invalid_argument.
void check_quantized_matmul_args(
    const char* op,
    const char* w_form,
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int lead_dims,
    int bits,
    int group_size);

// inputs: x (..., K) any strides, w, scales, biases -> y (..., N) in x's dtype
class QuantizedLinear : public mx::UnaryPrimitive {
 public:
  QuantizedLinear(mx::Stream stream, int bits, int group_size)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantQuantizedLinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int bits_;
  int group_size_;
};

} // namespace moequant
