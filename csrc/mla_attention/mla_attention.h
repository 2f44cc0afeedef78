// mla_decode_attention: one decode step of MLA's absorbed attention read directly from
// an affine-quantized (4/8-bit) latent KV cache. CPU kernel in mla_attention_cpu.*,
// Metal twin in metal/mla_attention.{h,metal}.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// q_lat (B, H, R), q_pe (B, H, DR) of one float dtype; the cache: lat_w (B, T, R*bits/32)
// uint32, lat_s / lat_b (B, T, R/group_size), pe_w (B, T, DR*bits/32), pe_s / pe_b
// (B, T, DR/group_size), scales and biases of one float dtype. Returns (B, H, R) in
// q_lat's dtype: softmax_t(scale * (q_lat . latent_t + q_pe . k_pe_t)) . latent.
mx::array mla_decode_attention(
    const mx::array& q_lat,
    const mx::array& q_pe,
    const mx::array& lat_w,
    const mx::array& lat_s,
    const mx::array& lat_b,
    const mx::array& pe_w,
    const mx::array& pe_s,
    const mx::array& pe_b,
    float scale,
    int bits,
    int group_size,
    mx::StreamOrDevice s = {});

class MlaDecodeAttention : public mx::UnaryPrimitive {
 public:
  MlaDecodeAttention(mx::Stream stream, float scale, int bits, int group_size)
      : mx::UnaryPrimitive(stream), scale_(scale), bits_(bits), group_size_(group_size) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantMlaDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  float scale_;
  int bits_;
  int group_size_;
};

} // namespace moequant
