// softmax_rows: p = softmax(scale * s) along the last axis over the positions a boolean
// mask allows (masked ones get probability 0), float32, on the CPU. MLX's CPU softmax
// and where run at ~10-40 M elements/s on this project's machines, which made them the
// largest cost of a 2048-token MLA attention; this is one pass per row that skips the
// masked positions (half of a causal mask). GPU streams run the equivalent MLX ops.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// s (..., L, S) float32; mask (L, S) bool (true: attend), shared by every leading index,
// or none. A row with every position masked gets the uniform distribution (what
// softmax of a row of equal minimal values gives, as mlx-lm's masking does).
mx::array softmax_rows(
    const mx::array& s,
    const std::optional<mx::array>& mask,
    float scale,
    mx::StreamOrDevice st = {});

namespace cpu {
// The op's CPU rows without a mask on row-contiguous float32 data, for primitives that
// run it inside their own task (mla_decode_core): s (rows, S) -> p (rows, S).
void softmax_rows(const float* s, float* p, int64_t rows, int64_t S, float scale);
} // namespace cpu

// inputs: s (..., L, S) any strides, [mask (L, S) bool] -> p (..., L, S) row-contiguous
class SoftmaxRows : public mx::UnaryPrimitive {
 public:
  SoftmaxRows(mx::Stream stream, float scale) : mx::UnaryPrimitive(stream), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantSoftmaxRows";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const SoftmaxRows&>(other).scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
};

} // namespace moequant
