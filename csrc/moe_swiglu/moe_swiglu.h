// moe_swiglu: the fused quantized MoE-expert SwiGLU GEMV used at decode.
//
//   y[t] = sum_j scores[t,j] * down[e_tj]( silu(gate[e_tj] x_t) * up[e_tj] x_t )
//
// Two primitives chained in the graph, one per phase, so that CPU and Metal share the
// same split: MoeGateUp writes the small float32 intermediate h (T, k, I); MoeDown
// reads it, applies the scores and reduces over the k experts, writing y.
//
// moe_prefill: the same function for many tokens (prefill, evaluation), CPU only: the
// tokens are grouped by selected expert and each expert runs as small quantized GEMMs
// over its tokens, so its weights are read once per call rather than once per token.
#pragma once

#include "common/kernel_encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// One stacked-expert affine-quantized projection (mlx-lm's QuantizedSwitchLinear):
// weight (E, out, in*bits/32) uint32, scales and biases (E, out, in/group_size).
struct QuantProj {
  mx::array weight;
  mx::array scales;
  mx::array biases;
  int bits;
  int group_size;
};

mx::array moe_swiglu(
    const mx::array& x,
    const mx::array& indices,
    const mx::array& scores,
    const QuantProj& gate,
    const QuantProj& up,
    const QuantProj& down,
    mx::StreamOrDevice s = {});

mx::array moe_prefill(
    const mx::array& x,
    const mx::array& indices,
    const mx::array& scores,
    const QuantProj& gate,
    const QuantProj& up,
    const QuantProj& down,
    mx::StreamOrDevice s = {});

struct ProjParams {
  int bits;
  int group_size;
  bool operator==(const ProjParams&) const = default;
};

// inputs: x (T, D), indices (T, k) uint32, gate w/s/b, up w/s/b -> h (T, k, I) float32
class MoeGateUp : public mx::UnaryPrimitive, public MetalDispatch {
 public:
  MoeGateUp(mx::Stream stream, ProjParams gate, ProjParams up)
      : mx::UnaryPrimitive(stream), gate_(gate), up_(up) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoeGateUp";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  void encode(
      KernelEncoder& enc,
      const std::vector<mx::array>& inputs,
      const std::vector<mx::array>& outputs) const override;

 private:
  ProjParams gate_;
  ProjParams up_;
};

// inputs: h (T, k, I) float32, indices (T, k) uint32, scores (T, k) float32,
// down w/s/b -> y (T, D) in out_dtype
class MoeDown : public mx::UnaryPrimitive, public MetalDispatch {
 public:
  MoeDown(mx::Stream stream, ProjParams down) : mx::UnaryPrimitive(stream), down_(down) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoeDown";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  void encode(
      KernelEncoder& enc,
      const std::vector<mx::array>& inputs,
      const std::vector<mx::array>& outputs) const override;

 private:
  ProjParams down_;
};

// inputs: x (T, D), indices (T, k) uint32, scores (T, k) float32, gate w/s/b, up w/s/b,
// down w/s/b -> y (T, D) in x's dtype. CPU only (on a GPU, MLX's gather_qmm batches).
class MoePrefill : public mx::UnaryPrimitive {
 public:
  MoePrefill(mx::Stream stream, ProjParams gate, ProjParams up, ProjParams down)
      : mx::UnaryPrimitive(stream), gate_(gate), up_(up), down_(down) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoePrefill";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  ProjParams gate_;
  ProjParams up_;
  ProjParams down_;
};

} // namespace moequant
