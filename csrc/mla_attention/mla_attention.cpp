#include "mla_attention/mla_attention.h"

#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "mla_attention/mla_attention_cpu.h"
#include "mlx/backend/cpu/encoder.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.mla_decode_attention] " + msg);
}

void check_shape(const mx::array& a, const mx::Shape& want, const char* name) {
  if (a.shape() != want) {
    fail(std::string(name) + " must have shape " + shape_str(want) + "; got " +
         shape_str(a.shape()) + ".");
  }
}

cpu::MlaDtype mla_dtype(mx::Dtype t) {
  return t == mx::float32 ? cpu::MlaDtype::f32
                          : (t == mx::float16 ? cpu::MlaDtype::f16 : cpu::MlaDtype::bf16);
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
  if (!(bits == 4 || bits == 8)) {
    fail("bits must be 4 or 8; got " + std::to_string(bits) + ".");
  }
  check_group_size("[moequant.mla_decode_attention] ", "group_size", group_size);
  if (!is_float(q_lat.dtype()) || q_pe.dtype() != q_lat.dtype()) {
    fail("q_lat and q_pe must be float32, float16 or bfloat16 of one dtype; got " +
         dtype_str(q_lat.dtype()) + " and " + dtype_str(q_pe.dtype()) + ".");
  }
  if (q_lat.ndim() != 3 || q_pe.ndim() != 3) {
    fail("q_lat and q_pe must have shape (B, H, R) and (B, H, DR); got " +
         shape_str(q_lat.shape()) + " and " + shape_str(q_pe.shape()) + ".");
  }
  const int B = q_lat.shape(0), H = q_lat.shape(1), R = q_lat.shape(2), DR = q_pe.shape(2);
  check_shape(q_pe, {B, H, DR}, "q_pe");
  if (R % group_size != 0 || DR % group_size != 0) {
    fail("the latent dimension " + std::to_string(R) + " and the rope dimension " +
         std::to_string(DR) + " must both be multiples of group_size " +
         std::to_string(group_size) + ".");
  }
  if (lat_w.dtype() != mx::uint32 || pe_w.dtype() != mx::uint32) {
    fail("lat_w and pe_w must be uint32 (packed codes).");
  }
  if (lat_w.ndim() != 3 || lat_w.shape(0) != B) {
    fail("lat_w must have shape (B=" + std::to_string(B) + ", T, R*bits/32); got " +
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
      fail("scales and biases must all have one dtype (" + dtype_str(sd) + "); got " +
           dtype_str(a->dtype()) + ".");
    }
  }
  auto st = mx::to_stream(s);
  if (st.device == mx::Device::gpu) {
    // Until the Metal kernel (metal/mla_attention.h) is dispatched from here, GPU
    // streams compose MLX's own ops: dequantize, matmuls, a precise softmax.
    auto deq = [&](const mx::array& w, const mx::array& sc, const mx::array& bi) {
      return mx::astype(mx::dequantize(w, sc, bi, group_size, bits, "affine", std::nullopt, mx::float32, st),
                        mx::float32, st);
    };
    auto lat = deq(lat_w, lat_s, lat_b); // (B, T, R)
    auto pe = deq(pe_w, pe_s, pe_b);
    auto f = [&](const mx::array& q) { return mx::astype(q, mx::float32, st); };
    auto sc = mx::add(mx::matmul(f(q_lat), mx::swapaxes(lat, 1, 2, st), st),
                      mx::matmul(f(q_pe), mx::swapaxes(pe, 1, 2, st), st), st);
    auto p = mx::softmax(mx::multiply(sc, mx::array(scale), st), std::vector<int>{-1}, true, st);
    return mx::astype(mx::matmul(p, lat, st), q_lat.dtype(), st);
  }
  auto c = [&](const mx::array& a) { return mx::contiguous(a, false, st); };
  return mx::array(
      {B, H, R},
      q_lat.dtype(),
      std::make_shared<MlaDecodeAttention>(st, scale, bits, group_size),
      {c(mx::astype(q_lat, mx::float32, st)), c(mx::astype(q_pe, mx::float32, st)), c(lat_w),
       c(lat_s), c(lat_b), c(pe_w), c(pe_s), c(pe_b)});
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
  // The op builder sends GPU streams to MLX ops (see mla_decode_attention).
  throw std::runtime_error("[moequant.mla_decode_attention] no GPU dispatch of its own yet.");
}

} // namespace moequant
