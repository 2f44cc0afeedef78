#include "mla_attention/mla_attention.h"

#include <array>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_task.h"
#include "common/strided.h"
#include "mla_attention/mla_attention_cpu.h"
#include "mla_attention/mla_decode_core_cpu.h"
#include "moe_swiglu/moe_swiglu_cpu.h"
#include "quantized_linear/quantized_linear.h"
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

// ---- mla_decode_core

namespace moequant {

namespace {

[[noreturn]] void core_fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.mla_decode_core] " + msg);
}

// d of a (B, H, d) query or a (B, H, 1, d) decode query.
void check_query(const mx::array& a, const char* name) {
  if (!(a.ndim() == 3 || (a.ndim() == 4 && a.shape(2) == 1))) {
    core_fail(
        std::string(name) + " must have shape (B, H, d) or (B, H, 1, d); got " +
        shape_str(a.shape()) + ".");
  }
}

// A (B, S, d) cache tensor or a (B, 1, S, d) cache view.
void check_cache(const mx::array& a, const char* name) {
  if (!(a.ndim() == 3 || (a.ndim() == 4 && a.shape(1) == 1))) {
    core_fail(
        std::string(name) + " must have shape (B, S, d) or (B, 1, S, d); got " +
        shape_str(a.shape()) + ".");
  }
}

// The argument checks of both forms; returns {B, H, S, R, DR, DV}.
std::array<int, 6> check_core_args(
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
    int q_bits,
    int q_gs,
    int o_bits,
    int o_gs) {
  check_query(q_nope, "q_nope");
  check_query(q_pe, "q_pe");
  check_cache(latent, "latent");
  check_cache(k_pe, "k_pe");
  if (!is_float(q_nope.dtype()) || q_pe.dtype() != q_nope.dtype()) {
    core_fail(
        "q_nope and q_pe must be float32, float16 or bfloat16 of one dtype; got " +
        dtype_str(q_nope.dtype()) + " and " + dtype_str(q_pe.dtype()) + ".");
  }
  if (!is_float(latent.dtype()) || k_pe.dtype() != latent.dtype()) {
    core_fail(
        "latent and k_pe must be float32, float16 or bfloat16 of one dtype; got " +
        dtype_str(latent.dtype()) + " and " + dtype_str(k_pe.dtype()) + ".");
  }
  const int B = q_nope.shape(0), H = q_nope.shape(1);
  const int DR = q_pe.shape(-1), R = latent.shape(-1), S = latent.shape(-2);
  if (q_pe.shape(0) != B || q_pe.shape(1) != H) {
    core_fail(
        "q_pe's (B, H) must be q_nope's: " + shape_str(q_pe.shape()) + " and " +
        shape_str(q_nope.shape()) + ".");
  }
  if (latent.shape(0) != B || k_pe.shape(0) != B || k_pe.shape(-2) != S) {
    core_fail(
        "latent and k_pe must hold S positions of q_nope's B = " + std::to_string(B) +
        " rows; got " + shape_str(latent.shape()) + " and " + shape_str(k_pe.shape()) + ".");
  }
  if (k_pe.shape(-1) != DR) {
    core_fail(
        "k_pe's rope dimension " + std::to_string(k_pe.shape(-1)) + " differs from q_pe's " +
        std::to_string(DR) + ".");
  }
  if (S < 1) {
    core_fail("the cache is empty (S = 0): a decode step attends to at least its own token.");
  }
  // The up-projections as quantized_multi_linear takes them: embed_q maps q_nope's dn
  // to R per head, unembed_out the latent's R to dv.
  check_quantized_matmul_args(
      "[moequant.mla_decode_core] embed_q: ",
      "(H, R, dn*bits/32)",
      q_nope,
      wq,
      sq,
      bq,
      1,
      q_bits,
      q_gs);
  if (wq.shape(0) != H || wq.shape(1) != R) {
    core_fail(
        "embed_q's weight must have shape (H=" + std::to_string(H) + ", R=" + std::to_string(R) +
        ", ...); got " + shape_str(wq.shape()) + ".");
  }
  check_quantized_matmul_args(
      "[moequant.mla_decode_core] unembed_out: ",
      "(H, dv, R*bits/32)",
      latent,
      wo,
      so,
      bo,
      1,
      o_bits,
      o_gs);
  if (wo.shape(0) != H) {
    core_fail(
        "unembed_out's weight must have H=" + std::to_string(H) + " heads; got " +
        shape_str(wo.shape()) + ".");
  }
  return {B, H, S, R, DR, wo.shape(1)};
}

// Row r of `a` (viewed as (size / D, D)) into float32 dst, from any strides and dtype.
void load_rows(const mx::array& a, float* dst, int64_t ld) {
  const int64_t D = a.shape(-1);
  const int64_t rows = D ? static_cast<int64_t>(a.size()) / D : 0;
  const int64_t sd = a.strides().back();
  const std::size_t item = a.itemsize();
  const char* src = static_cast<const char*>(a.data<void>());
  std::vector<char> gathered(sd == 1 ? 0 : D * item);
  for (int64_t r = 0; r < rows; ++r) {
    const char* s = src + row_offset(a, r) * static_cast<int64_t>(item);
    if (sd != 1) {
      for (int64_t j = 0; j < D; ++j) {
        std::memcpy(gathered.data() + j * item, s + j * sd * static_cast<int64_t>(item), item);
      }
      s = gathered.data();
    }
    cpu::load_floats(s, a.dtype(), static_cast<std::size_t>(D), dst + r * ld);
  }
}

qgemm::QuantWeight
quant_weight(const mx::array& w, const mx::array& s, const mx::array& b, int bits, int gs) {
  qgemm::QuantWeight q;
  q.w = w.data<uint32_t>();
  q.scales = s.data<void>();
  q.biases = b.data<void>();
  q.sb_dtype = s.dtype();
  q.bits = bits;
  q.group_size = gs;
  q.N = w.shape(1);
  q.K = w.shape(2) * 32 / bits;
  return q;
}

} // namespace

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
    mx::StreamOrDevice s) {
  const auto d = check_core_args(
      q_nope,
      q_pe,
      latent,
      k_pe,
      wq,
      sq,
      bq,
      wo,
      so,
      bo,
      q_bits,
      q_group_size,
      o_bits,
      o_group_size);
  auto st = mx::to_stream(s);
  if (st.device == mx::Device::gpu) {
    // MLX's Metal kernels do these products well: the same math in MLX's ops.
    return mla_decode_core_mlx_graph(
        q_nope,
        q_pe,
        latent,
        k_pe,
        wq,
        sq,
        bq,
        wo,
        so,
        bo,
        scale,
        q_bits,
        q_group_size,
        o_bits,
        o_group_size,
        st);
  }
  // The queries and the cache go in as they are (views of the cache's buffer: no
  // Contiguous nodes), read row by row at eval time; the weights are evaluated and
  // row-contiguous (contiguous_as passes them as they are).
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), st); };
  return mx::array(
      {d[0], d[1], d[5]},
      q_nope.dtype(),
      std::make_shared<MlaDecodeCore>(st, scale, q_bits, q_group_size, o_bits, o_group_size),
      {q_nope, q_pe, latent, k_pe, c(wq), c(sq), c(bq), c(wo), c(so), c(bo)});
}

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
    mx::StreamOrDevice s) {
  const auto d = check_core_args(
      q_nope,
      q_pe,
      latent,
      k_pe,
      wq,
      sq,
      bq,
      wo,
      so,
      bo,
      q_bits,
      q_group_size,
      o_bits,
      o_group_size);
  const int B = d[0], H = d[1], S = d[2], R = d[3], DR = d[4], DV = d[5];
  auto st = mx::to_stream(s);
  const auto f32 = mx::float32;
  auto f = [&](const mx::array& a, const mx::Shape& shape) {
    return mx::reshape(mx::astype(a, f32, st), shape, st);
  };
  // The heads as rows of one query block per batch row, against the one latent head.
  auto qn = f(q_nope, {B, H, 1, static_cast<int>(q_nope.shape(-1))});
  auto qlat = mx::quantized_matmul(qn, wq, sq, bq, true, q_group_size, q_bits, "affine", st);
  auto q = mx::concatenate({qlat, f(q_pe, {B, H, 1, DR})}, -1, st); // (B, H, 1, R + DR)
  auto lat = f(latent, {B, 1, S, R});
  auto k = mx::concatenate({lat, f(k_pe, {B, 1, S, DR})}, -1, st); // (B, 1, S, R + DR)
  auto sc = mx::matmul(mx::reshape(q, {B, 1, H, R + DR}, st), mx::swapaxes(k, -1, -2, st), st);
  auto p = mx::softmax(mx::multiply(sc, mx::array(scale), st), std::vector<int>{-1}, true, st);
  auto o = mx::reshape(mx::matmul(p, lat, st), {B, H, 1, R}, st);
  auto y = mx::quantized_matmul(o, wo, so, bo, true, o_group_size, o_bits, "affine", st);
  return mx::astype(mx::reshape(y, {B, H, DV}, st), q_nope.dtype(), st);
}

bool MlaDecodeCore::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MlaDecodeCore&>(other);
  return scale_ == o.scale_ && q_bits_ == o.q_bits_ && q_gs_ == o.q_gs_ && o_bits_ == o.o_bits_ &&
      o_gs_ == o.o_gs_;
}

std::vector<mx::Shape> MlaDecodeCore::output_shapes(const std::vector<mx::array>& in) {
  return {{in[0].shape(0), in[0].shape(1), in[7].shape(1)}};
}

void MlaDecodeCore::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  cpu::MlaCoreArgs a;
  a.B = in[0].shape(0);
  a.H = in[0].shape(1);
  a.S = in[2].shape(-2);
  a.R = in[2].shape(-1);
  a.DR = in[1].shape(-1);
  a.scale = scale_;
  a.wq = quant_weight(in[4], in[5], in[6], q_bits_, q_gs_);
  a.wo = quant_weight(in[7], in[8], in[9], o_bits_, o_gs_);
  const mx::array qn = in[0], qp = in[1], lat = in[2], kp = in[3];
  void* dst = out.data<void>();
  const auto odt = out.dtype();
  enqueue_cpu(stream(), in, {out}, [a, qn, qp, lat, kp, dst, odt]() mutable {
    const int64_t RD = a.R + a.DR, BH = a.B * a.H, DN = qn.shape(-1), DV = a.wo.N;
    // float32 rows, laid out as the chain's concatenations: the query (B, H, R + dr)
    // with q_pe after embed_q's R values, the keys (B, S, R + dr).
    std::vector<float> qnf(static_cast<std::size_t>(BH * DN)),
        qk(static_cast<std::size_t>(BH * RD));
    std::vector<float> k(static_cast<std::size_t>(a.B * a.S * RD));
    load_rows(qn, qnf.data(), DN);
    load_rows(qp, qk.data() + a.R, RD);
    load_rows(lat, k.data(), RD);
    load_rows(kp, k.data() + a.R, RD);
    a.q_nope = qnf.data();
    a.qk = qk.data();
    a.k = k.data();
    const bool f32 = odt == mx::float32;
    std::vector<float> y(f32 ? 0 : static_cast<std::size_t>(BH * DV));
    a.y = f32 ? static_cast<float*>(dst) : y.data();
    cpu::mla_decode_core(a);
    if (!f32) {
      cpu::store_floats(y.data(), y.size(), odt, dst);
    }
  });
}

void MlaDecodeCore::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // The op builder gives GPU streams MLX's ops (mla_decode_core_mlx_graph).
  throw std::runtime_error("[moequant.mla_decode_core] no GPU kernel of its own.");
}

} // namespace moequant
