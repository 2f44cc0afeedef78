// mla_decode_attention: one decode step of MLA's absorbed attention read directly from
// an affine-quantized (4/8-bit) latent KV cache. CPU kernel in mla_attention_cpu.*,
// Metal twin in metal/mla_attention.{h,metal}: on a GPU stream the op is two primitives,
// one per Metal kernel (MlaDecodePartial, MlaDecodeMerge), dispatched through
// KernelEncoder like moe_swiglu.
#pragma once

#include "common/kernel_encoder.h"
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

// The op's Metal form (the graph a GPU stream gets) built on any stream, without the
// check that Metal can run: the emulator tests record its host dispatch on Linux
// (bound as moequant._ext._mla_decode_attention_metal_graph). Its primitives have no
// CPU evaluation.
mx::array mla_decode_attention_metal_graph(
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

// mla_decode_core: one decode step of MLA's absorbed attention over a float KV cache,
// from the query heads to the value heads, as ONE primitive on the CPU (a decode step
// spent ~15 graph nodes per layer on this chain, each a few us of dispatch for
// microseconds of arithmetic). For every batch row b and head h:
//   q_lat = embed_q[h](q_nope[b, h])                       (R values)
//   s_t   = scale * (q_lat . latent[b, t] + q_pe[b, h] . k_pe[b, t])
//   out   = unembed_out[h](sum_t softmax(s)_t * latent[b, t])   (dv values)
// The CPU task runs the same kernels in the same order as the op-by-op chain
// (quantized_multi_linear's rows, matmul_nt, softmax_rows), so its result is
// bit-identical to it. q_nope (B, H, dn) and q_pe (B, H, dr) of one float dtype (a
// (B, H, 1, d) query is taken as it is); latent (B, S, R) and k_pe (B, S, dr) of one
// float dtype (a (B, 1, S, d) cache view too), any strides; the up-projections as
// QuantizedMultiLinear holds them: wq (H, R, dn*bits/32), sq / bq (H, R, dn/gs) and
// wo (H, dv, R*bits/32), so / bo (H, dv, R/gs). Returns (B, H, dv) in q_nope's dtype.
mx::array mla_decode_core(
    const mx::array& q_nope,
    const mx::array& q_pe,
    const mx::array& latent,
    const mx::array& k_pe,
    const mx::array& wq,
    const mx::array& sq,
    const mx::array& bq,
    const mx::array& wo,
    const mx::array& so,
    const mx::array& bo,
    float scale,
    int q_bits,
    int q_group_size,
    int o_bits,
    int o_group_size,
    mx::StreamOrDevice s = {});

// The op's GPU form (MLX's own ops: quantized_matmul, matmul, softmax) built on any
// stream: what a GPU stream gets, bound as moequant._ext._mla_decode_core_mlx_graph so
// that the tests evaluate it on the CPU.
mx::array mla_decode_core_mlx_graph(
    const mx::array& q_nope,
    const mx::array& q_pe,
    const mx::array& latent,
    const mx::array& k_pe,
    const mx::array& wq,
    const mx::array& sq,
    const mx::array& bq,
    const mx::array& wo,
    const mx::array& so,
    const mx::array& bo,
    float scale,
    int q_bits,
    int q_group_size,
    int o_bits,
    int o_group_size,
    mx::StreamOrDevice s = {});

// inputs: q_nope, q_pe, latent, k_pe (any strides), wq, sq, bq, wo, so, bo -> (B, H, dv)
class MlaDecodeCore : public mx::UnaryPrimitive {
 public:
  MlaDecodeCore(mx::Stream stream, float scale, int q_bits, int q_gs, int o_bits, int o_gs)
      : mx::UnaryPrimitive(stream),
        scale_(scale),
        q_bits_(q_bits),
        q_gs_(q_gs),
        o_bits_(o_bits),
        o_gs_(o_gs) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantMlaDecodeCore";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  float scale_;
  int q_bits_;
  int q_gs_;
  int o_bits_;
  int o_gs_;
};

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

// Metal kernel A (mla_decode_partial): inputs q_lat, q_pe (one float dtype), lat_w/s/b,
// pe_w/s/b -> per (batch, chunk, head) softmax state: ml (B, nc, H, 2) = (max, sum) and
// acc (B, nc, H, R), float32.
class MlaDecodePartial : public mx::Primitive, public MetalDispatch {
 public:
  MlaDecodePartial(mx::Stream stream, float scale, int bits, int group_size, int chunk)
      : mx::Primitive(stream), scale_(scale), bits_(bits), group_size_(group_size), chunk_(chunk) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MoequantMlaDecodePartial";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  void encode(
      KernelEncoder& enc,
      const std::vector<mx::array>& inputs,
      const std::vector<mx::array>& outputs) const override;

 private:
  float scale_;
  int bits_;
  int group_size_;
  int chunk_;
};

// Metal kernel B (mla_decode_merge): ml, acc -> (B, H, R) in the output dtype.
class MlaDecodeMerge : public mx::UnaryPrimitive, public MetalDispatch {
 public:
  explicit MlaDecodeMerge(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MoequantMlaDecodeMerge";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  void encode(
      KernelEncoder& enc,
      const std::vector<mx::array>& inputs,
      const std::vector<mx::array>& outputs) const override;
};

} // namespace moequant
