// rms_norm and rope: mx.fast.rms_norm and mx.fast.rope as one CPU primitive each.
//
// MLX 0.32 has no CPU kernel for either: on the CPU stream both build their fallback
// graphs, 12 primitives per rms_norm and ~36 per rope call, and an MLX CPU primitive
// costs ~7-8 us on this project's hosts whatever it does (bench/RESULTS.md, issue 15
// session 4): a decode token of a 4-layer DeepSeek-V3 spent ~2.5 ms in those graphs.
// These primitives compute exactly what the fallbacks compute, operation by operation
// in the same order and the same dtypes (float32 math, MLX's own simd exp/sin/cos, the
// sequential float32 sum of MLX's CPU reduction, the roundings to bf16/f16 where the
// fallback rounds), so their bits equal mx.fast's on the CPU. GPU streams call
// mx.fast.rms_norm / mx.fast.rope themselves (MLX's Metal kernels): nothing new on the
// Metal side.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// mx.fast.rms_norm(x, weight, eps): x (..., D), weight (D,) or none.
mx::array rms_norm(
    const mx::array& x,
    const std::optional<mx::array>& weight,
    float eps,
    mx::StreamOrDevice s = {});

// mx.fast.rope(x, dims, traditional, base, scale, offset, freqs) (forward rotation):
// x (B, ..., T, D), offset an integer scalar or (B,) array, freqs (dims / 2,) or none.
mx::array rope(
    const mx::array& x,
    int dims,
    bool traditional,
    std::optional<float> base,
    float scale,
    const mx::array& offset,
    const std::optional<mx::array>& freqs,
    mx::StreamOrDevice s = {});

// inputs: x (..., D) any strides, w (D,) in the output dtype (absent: no weight).
class RMSNormRows : public mx::UnaryPrimitive {
 public:
  RMSNormRows(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantRMSNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RMSNormRows&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float eps_;
};

// inputs: x (B, ..., T, D) any strides, offset int32 (1,) or (B,), [freqs float32
// (dims / 2,)]; without freqs the frequencies come from base, as MLX makes them.
class RoPERows : public mx::UnaryPrimitive {
 public:
  RoPERows(mx::Stream stream, int dims, bool traditional, float base, float scale)
      : mx::UnaryPrimitive(stream),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantRoPE";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const RoPERows&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ &&
        scale_ == o.scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  int dims_;
  bool traditional_;
  float base_;
  float scale_;
};

} // namespace moequant
