#include "mla_attention/mla_attention.h"

#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "mla_attention/mla_attention_cpu.h"
#include "mla_attention_launch.h"
#include "mlx/backend/cpu/encoder.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.mla_decode_attention] " + msg);
}

void check_shape(const mx::array& a, const mx::Shape& want, const char* name) {
  if (a.shape() != want) {
    fail(
        std::string(name) + " must have shape " + shape_str(want) + "; got " +
        shape_str(a.shape()) + ".");
  }
}

cpu::MlaDtype mla_dtype(mx::Dtype t) {
  return t == mx::float32 ? cpu::MlaDtype::f32
                          : (t == mx::float16 ? cpu::MlaDtype::f16 : cpu::MlaDtype::bf16);
}

// The argument checks shared by both forms (std::invalid_argument naming the argument).
void check_args(
    const mx::array& q_lat,
    const mx::array& q_pe,
    const mx::array& lat_w,
    const mx::array& lat_s,
    const mx::array& lat_b,
    const mx::array& pe_w,
    const mx::array& pe_s,
    const mx::array& pe_b,
    int bits,
    int group_size) {
  if (!supported_bits<KvCacheBits>(bits)) {
    fail("bits must be 4 or 8; got " + std::to_string(bits) + ".");
  }
  check_group_size("[moequant.mla_decode_attention] ", "group_size", group_size);
  if (!is_float(q_lat.dtype()) || q_pe.dtype() != q_lat.dtype()) {
    fail(
        "q_lat and q_pe must be float32, float16 or bfloat16 of one dtype; got " +
        dtype_str(q_lat.dtype()) + " and " + dtype_str(q_pe.dtype()) + ".");
  }
  if (q_lat.ndim() != 3 || q_pe.ndim() != 3) {
    fail(
        "q_lat and q_pe must have shape (B, H, R) and (B, H, DR); got " + shape_str(q_lat.shape()) +
        " and " + shape_str(q_pe.shape()) + ".");
  }
  const int B = q_lat.shape(0), H = q_lat.shape(1), R = q_lat.shape(2), DR = q_pe.shape(2);
  check_shape(q_pe, {B, H, DR}, "q_pe");
  if (R % group_size != 0 || DR % group_size != 0) {
    fail(
        "the latent dimension " + std::to_string(R) + " and the rope dimension " +
        std::to_string(DR) + " must both be multiples of group_size " + std::to_string(group_size) +
        ".");
  }
  if (lat_w.dtype() != mx::uint32 || pe_w.dtype() != mx::uint32) {
    fail("lat_w and pe_w must be uint32 (packed codes).");
  }
  if (lat_w.ndim() != 3 || lat_w.shape(0) != B) {
    fail(
        "lat_w must have shape (B=" + std::to_string(B) + ", T, R*bits/32); got " +
        shape_str(lat_w.shape()) + ".");
  }
  const int T = lat_w.shape(1);
  if (T < 1) {
    fail("the cache is empty (T = 0): a decode step attends to at least its own token.");
  }
  check_shape(lat_w, {B, T, R * bits / 32}, "lat_w");
  check_shape(pe_w, {B, T, DR * bits / 32}, "pe_w");
  check_shape(lat_s, {B, T, R / group_size}, "lat_s");
  check_shape(lat_b, {B, T, R / group_size}, "lat_b");
  check_shape(pe_s, {B, T, DR / group_size}, "pe_s");
  check_shape(pe_b, {B, T, DR / group_size}, "pe_b");
  const auto sd = lat_s.dtype();
  if (!is_float(sd)) {
    fail("scales must be float32, float16 or bfloat16; got " + dtype_str(sd) + ".");
  }
  for (auto* a : {&lat_b, &pe_s, &pe_b}) {
    if (a->dtype() != sd) {
      fail(
          "scales and biases must all have one dtype (" + dtype_str(sd) + "); got " +
          dtype_str(a->dtype()) + ".");
    }
  }
}

} // namespace

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
    mx::StreamOrDevice s) {
  // Bad arguments are refused the same way on every backend, before the Metal check.
  check_args(q_lat, q_pe, lat_w, lat_s, lat_b, pe_w, pe_s, pe_b, bits, group_size);
  if (wants_gpu(s)) {
    check_metal_stream(s, "mla_decode_attention");
    return mla_decode_attention_metal_graph(
        q_lat, q_pe, lat_w, lat_s, lat_b, pe_w, pe_s, pe_b, scale, bits, group_size, s);
  }
  auto st = mx::to_stream(s);
  const int B = q_lat.shape(0), H = q_lat.shape(1), R = q_lat.shape(2);
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), st); };
  return mx::array(
      {B, H, R},
      q_lat.dtype(),
      std::make_shared<MlaDecodeAttention>(st, scale, bits, group_size),
      {c(mx::astype(q_lat, mx::float32, st)),
       c(mx::astype(q_pe, mx::float32, st)),
       c(lat_w),
       c(lat_s),
       c(lat_b),
       c(pe_w),
       c(pe_s),
       c(pe_b)});
}

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
    mx::StreamOrDevice s) {
  check_args(q_lat, q_pe, lat_w, lat_s, lat_b, pe_w, pe_s, pe_b, bits, group_size);
  const int B = q_lat.shape(0), H = q_lat.shape(1), R = q_lat.shape(2), DR = q_pe.shape(2);
  const int T = lat_w.shape(1);
  // The kernel keeps a head's query in registers (MQ_MLA_VPL values per lane) and a
  // block of rows in threadgroup memory.
  if (R > 32 * MQ_MLA_VPL || DR > 32 * MQ_MLA_VPL_PE || R + DR > MQ_MLA_ROW) {
    fail(
        "the Metal kernel takes a latent dimension up to " + std::to_string(32 * MQ_MLA_VPL) +
        ", a rope dimension up to " + std::to_string(32 * MQ_MLA_VPL_PE) + " and " +
        std::to_string(MQ_MLA_ROW) + " in all; got " + std::to_string(R) + " and " +
        std::to_string(DR) + ". Use stream=mx.cpu.");
  }
  auto st = mx::to_stream(s);
  const int chunk = launch::mla_metal_chunk(T);
  const int nc = (T + chunk - 1) / chunk;
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), st); };
  auto parts = mx::array::make_arrays(
      {{B, nc, H, 2}, {B, nc, H, R}},
      {mx::float32, mx::float32},
      std::make_shared<MlaDecodePartial>(st, scale, bits, group_size, chunk),
      {c(q_lat), c(q_pe), c(lat_w), c(lat_s), c(lat_b), c(pe_w), c(pe_s), c(pe_b)});
  return mx::array({B, H, R}, q_lat.dtype(), std::make_shared<MlaDecodeMerge>(st), parts);
}

bool MlaDecodeAttention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MlaDecodeAttention&>(other);
  return scale_ == o.scale_ && bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> MlaDecodeAttention::output_shapes(const std::vector<mx::array>& in) {
  return {in[0].shape()};
}

void MlaDecodeAttention::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  cpu::MlaArgs a;
  a.q_lat = in[0].data<float>();
  a.q_pe = in[1].data<float>();
  a.lat_w = in[2].data<uint8_t>();
  a.lat_s = in[3].data<void>();
  a.lat_b = in[4].data<void>();
  a.pe_w = in[5].data<uint8_t>();
  a.pe_s = in[6].data<void>();
  a.pe_b = in[7].data<void>();
  a.sdtype = mla_dtype(in[3].dtype());
  a.bits = bits_;
  a.group_size = group_size_;
  a.B = in[0].shape(0);
  a.H = in[0].shape(1);
  a.R = in[0].shape(2);
  a.DR = in[1].shape(2);
  a.T = in[2].shape(1);
  a.scale = scale_;
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& i : in) {
    enc.set_input_array(i);
  }
  // The kernel writes float32; other output dtypes get a float32 temporary and a cast.
  const bool f32 = out.dtype() == mx::float32;
  out.set_data(mx::allocator::malloc(out.nbytes()));
  enc.set_output_array(out);
  float* y = f32 ? out.data<float>() : nullptr;
  void* dst = out.data<void>();
  const auto odt = out.dtype();
  const size_t n = out.size();
  enc.dispatch([a, y, dst, odt, n]() {
    if (y) {
      cpu::mla_decode_attention(a, y);
      return;
    }
    std::vector<float> tmp(n);
    cpu::mla_decode_attention(a, tmp.data());
    for (size_t i = 0; i < n; ++i) {
      if (odt == mx::float16) {
        static_cast<mx::float16_t*>(dst)[i] = mx::float16_t(tmp[i]);
      } else {
        static_cast<mx::bfloat16_t*>(dst)[i] = mx::bfloat16_t(tmp[i]);
      }
    }
  });
}

void MlaDecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // The op builder gives GPU streams the Metal form (MlaDecodePartial, MlaDecodeMerge).
  throw std::runtime_error(
      "[moequant.mla_decode_attention] the fused CPU form has no GPU evaluation.");
}

bool MlaDecodePartial::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MlaDecodePartial&>(other);
  return scale_ == o.scale_ && bits_ == o.bits_ && group_size_ == o.group_size_ &&
      chunk_ == o.chunk_;
}

std::vector<mx::Shape> MlaDecodePartial::output_shapes(const std::vector<mx::array>& in) {
  const int B = in[0].shape(0), H = in[0].shape(1), R = in[0].shape(2), T = in[2].shape(1);
  const int nc = (T + chunk_ - 1) / chunk_;
  return {{B, nc, H, 2}, {B, nc, H, R}};
}

std::vector<mx::Shape> MlaDecodeMerge::output_shapes(const std::vector<mx::array>& in) {
  return {{in[1].shape(0), in[1].shape(2), in[1].shape(3)}};
}

void MlaDecodePartial::eval_cpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[moequant.mla_decode_attention] the Metal form runs on GPU streams only; on the CPU "
      "the op is one fused primitive.");
}

void MlaDecodeMerge::eval_cpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[moequant.mla_decode_attention] the Metal form runs on GPU streams only; on the CPU "
      "the op is one fused primitive.");
}

// ---- Metal: the host dispatch, written against KernelEncoder (common/kernel_encoder.h) so
// that the emulator tests execute it too; geometry, indices and names from
// mla_attention_launch.h.

void MlaDecodePartial::encode(
    KernelEncoder& enc,
    const std::vector<mx::array>& in,
    const std::vector<mx::array>& out) const {
  const uint32_t B = in[0].shape(0), H = in[0].shape(1), R = in[0].shape(2);
  const uint32_t DR = in[1].shape(2), T = in[2].shape(1), nc = out[0].shape(1);
  enc.set_kernel(
      launch::mla_decode_partial_name(dtype_str(in[0].dtype()), dtype_str(in[3].dtype()), bits_));
  const int bufs[8] = {
      MQ_MLA_Q_LAT,
      MQ_MLA_Q_PE,
      MQ_MLA_LAT_W,
      MQ_MLA_LAT_S,
      MQ_MLA_LAT_B,
      MQ_MLA_PE_W,
      MQ_MLA_PE_S,
      MQ_MLA_PE_B};
  for (int i = 0; i < 8; ++i) {
    enc.set_input(in[i], bufs[i]);
  }
  enc.set_output(out[0], MQ_MLA_PART_ML);
  enc.set_output(out[1], MQ_MLA_PART_ACC);
  enc.set_scalar(H, MQ_MLA_H);
  enc.set_scalar(T, MQ_MLA_T);
  enc.set_scalar(R, MQ_MLA_R);
  enc.set_scalar(DR, MQ_MLA_DR);
  enc.set_scalar(static_cast<uint32_t>(group_size_), MQ_MLA_GS);
  enc.set_scalar(static_cast<uint32_t>(chunk_), MQ_MLA_CHUNK);
  enc.set_scalar(scale_, MQ_MLA_SCALE);
  enc.dispatch_threadgroups({nc, (H + MQ_MLA_SG - 1) / MQ_MLA_SG, B}, {32, MQ_MLA_SG, 1});
}

void MlaDecodeMerge::encode(
    KernelEncoder& enc,
    const std::vector<mx::array>& in,
    const std::vector<mx::array>& out) const {
  const uint32_t B = in[1].shape(0), nc = in[1].shape(1), H = in[1].shape(2);
  const uint32_t R = in[1].shape(3);
  enc.set_kernel(launch::mla_decode_merge_name(dtype_str(out[0].dtype())));
  enc.set_input(in[0], MQ_MLM_PART_ML);
  enc.set_input(in[1], MQ_MLM_PART_ACC);
  enc.set_output(out[0], MQ_MLM_OUT);
  enc.set_scalar(H, MQ_MLM_H);
  enc.set_scalar(R, MQ_MLM_R);
  enc.set_scalar(nc, MQ_MLM_NC);
  enc.dispatch_threadgroups({H, B, 1}, {32, 1, 1});
}

void MlaDecodePartial::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  eval_metal(stream(), *this, out, in, "mla_decode_attention");
}

void MlaDecodeMerge::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  std::vector<mx::array> outs{out};
  eval_metal(stream(), *this, outs, in, "mla_decode_attention");
}

} // namespace moequant
