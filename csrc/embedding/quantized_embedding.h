// quantized_embedding: nn.QuantizedEmbedding's lookup (mx.dequantize of the rows of an
// affine-quantized table at the given ids) as one CPU primitive. On the CPU stream MLX
// builds it from ~56 primitives (gathers, a shift/unpack per code position, multiply,
// add; ~8 us each at decode on this project's hosts). The result has mx.dequantize's
// bits: the code converted to the scales' dtype, times the scale and plus the bias, each
// rounded to that dtype (MLX's CPU fallback, docs/mlx-facts 1.5). GPU streams run MLX's
// own ops (take + mx.dequantize): nothing new on the Metal side.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// ids (...) integer; w (V, K*bits/32) uint32; scales, biases (V, K/group_size) one float
// dtype. Returns (..., K) in the scales' dtype. Negative ids count from the end (as
// MLX's indexing); an id outside [-V, V) gives a row of NaN (MLX would read outside
// the table).
mx::array quantized_embedding(
    const mx::array& ids,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

// inputs: ids (any shape, int32 or int64, any strides), w, scales, biases (row-contiguous)
class QuantizedEmbedding : public mx::UnaryPrimitive {
 public:
  QuantizedEmbedding(mx::Stream stream, int bits, int group_size)
      : mx::UnaryPrimitive(stream), bits_(bits), group_size_(group_size) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantQuantizedEmbedding";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedEmbedding&>(other);
    return bits_ == o.bits_ && group_size_ == o.group_size_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int bits_;
  int group_size_;
};

} // namespace moequant
