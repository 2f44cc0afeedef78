// Metal kernels of mla_decode_attention; the CPU twin is csrc/mla_attention/.
//
// One decode step of MLA's absorbed attention over a 4/8-bit affine latent cache, in
// two launches:
//   A  mla_decode_partial: a threadgroup takes one chunk of cached positions of one
//      batch row and MQ_MLA_SG heads (one per simdgroup). Blocks of MQ_MLA_TB rows are
//      dequantized once into threadgroup memory by all threads (each packed word read
//      once per threadgroup), then each simdgroup scores them for its head (lanes split
//      R and DR, simd_sum) and keeps an online softmax (running max m, sum l, and the
//      weighted latent sum acc spread over the lanes). Writes (m, l, acc) per
//      (batch, chunk, head).
//   B  mla_decode_merge: per (batch, head), the chunks merged in chunk order:
//      out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, cast to T.
// Accumulation in float. Geometry, limits (checked by the host: R <= 32 * MQ_MLA_VPL,
// DR <= 32 * MQ_MLA_VPL_PE, R + DR <= MQ_MLA_ROW; Kimi/DeepSeek: 512 + 64), buffer
// indices and names: mla_attention_launch.h.
#pragma once

#include "mla_attention_launch.h"

// grid: (num_chunks, ceil(H / MQ_MLA_SG), B) threadgroups of (32, MQ_MLA_SG, 1).
template <typename T, typename S, int BITS>
[[kernel]] void mla_decode_partial(
    const device T* q_lat [[buffer(MQ_MLA_Q_LAT)]], // B x H x R
    const device T* q_pe [[buffer(MQ_MLA_Q_PE)]], // B x H x DR
    const device uint* lat_w [[buffer(MQ_MLA_LAT_W)]], // B x Tn x R*BITS/32
    const device S* lat_s [[buffer(MQ_MLA_LAT_S)]], // B x Tn x R/gs
    const device S* lat_b [[buffer(MQ_MLA_LAT_B)]],
    const device uint* pe_w [[buffer(MQ_MLA_PE_W)]], // B x Tn x DR*BITS/32
    const device S* pe_s [[buffer(MQ_MLA_PE_S)]], // B x Tn x DR/gs
    const device S* pe_b [[buffer(MQ_MLA_PE_B)]],
    device float* part_ml [[buffer(MQ_MLA_PART_ML)]], // B x nc x H x 2 (m, l)
    device float* part_acc [[buffer(MQ_MLA_PART_ACC)]], // B x nc x H x R
    constant uint& H [[buffer(MQ_MLA_H)]],
    constant uint& Tn [[buffer(MQ_MLA_T)]],
    constant uint& R [[buffer(MQ_MLA_R)]],
    constant uint& DR [[buffer(MQ_MLA_DR)]],
    constant uint& gs [[buffer(MQ_MLA_GS)]],
    constant uint& chunk [[buffer(MQ_MLA_CHUNK)]], // positions per chunk, a multiple of TB
    constant float& scale [[buffer(MQ_MLA_SCALE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float rows[MQ_MLA_TB * MQ_MLA_ROW];
  const uint c = tgid.x, b = tgid.z;
  const uint h = tgid.y * MQ_MLA_SG + sg;
  const bool live = h < H; // uniform per simdgroup; dead ones still reach the barriers
  const uint hq = live ? h : H - 1;
  const uint RW = R * BITS / 32, PW = DR * BITS / 32, VPW = 32 / BITS;
  const uint tid = sg * 32 + lane;
  float ql[MQ_MLA_VPL], qp[MQ_MLA_VPL_PE], acc[MQ_MLA_VPL];
  for (uint k = 0; k < MQ_MLA_VPL; ++k) {
    const uint i = lane + 32 * k;
    ql[k] = i < R ? float(q_lat[(ulong(b) * H + hq) * R + i]) : 0.0f;
    acc[k] = 0.0f;
  }
  for (uint k = 0; k < MQ_MLA_VPL_PE; ++k) {
    const uint i = lane + 32 * k;
    qp[k] = i < DR ? float(q_pe[(ulong(b) * H + hq) * DR + i]) : 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  const uint t0 = c * chunk, t1 = min(Tn, t0 + chunk);
  for (uint tb = t0; tb < t1; tb += MQ_MLA_TB) {
    const uint nb = min(uint(MQ_MLA_TB), t1 - tb);
    // Dequantize the block: one packed word per thread and step.
    for (uint j = tid; j < nb * (RW + PW); j += 32 * MQ_MLA_SG) {
      const uint r = j / (RW + PW), wi = j % (RW + PW);
      const ulong t = ulong(b) * Tn + tb + r;
      const bool is_lat = wi < RW;
      const uint word = is_lat ? lat_w[t * RW + wi] : pe_w[t * PW + (wi - RW)];
      const uint v0 = (is_lat ? wi : wi - RW) * VPW;
      const uint ng = (is_lat ? R : DR) / gs;
      const ulong gi = t * ng + v0 / gs;
      const float sc = float(is_lat ? lat_s[gi] : pe_s[gi]);
      const float bi = float(is_lat ? lat_b[gi] : pe_b[gi]);
      threadgroup float* dst = rows + r * MQ_MLA_ROW + (is_lat ? 0 : R) + v0;
      for (uint k = 0; k < VPW; ++k) {
        dst[k] = float((word >> (k * BITS)) & ((1u << BITS) - 1u)) * sc + bi;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint r = 0; r < nb; ++r) {
      const threadgroup float* row = rows + r * MQ_MLA_ROW;
      float part = 0.0f;
      for (uint k = 0; k < MQ_MLA_VPL; ++k) {
        const uint i = lane + 32 * k;
        part += i < R ? ql[k] * row[i] : 0.0f;
      }
      for (uint k = 0; k < MQ_MLA_VPL_PE; ++k) {
        const uint i = lane + 32 * k;
        part += i < DR ? qp[k] * row[R + i] : 0.0f;
      }
      const float s = scale * simd_sum(part);
      // Online softmax (values uniform across the simdgroup). A NaN score makes m
      // stay and p NaN, so the output is NaN.
      const float mn = max(m, s);
      const float alpha = m == -INFINITY ? 0.0f : exp(m - mn);
      const float p = exp(s - mn);
      l = l * alpha + p;
      for (uint k = 0; k < MQ_MLA_VPL; ++k) {
        const uint i = lane + 32 * k;
        acc[k] = acc[k] * alpha + (i < R ? p * row[i] : 0.0f);
      }
      m = mn;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (live) {
    const uint ncs = (Tn + chunk - 1) / chunk;
    const ulong at = (ulong(b) * ncs + c) * H + h;
    for (uint k = 0; k < MQ_MLA_VPL; ++k) {
      const uint i = lane + 32 * k;
      if (i < R) {
        part_acc[at * R + i] = acc[k];
      }
    }
    if (lane == 0) {
      part_ml[at * 2] = m;
      part_ml[at * 2 + 1] = l;
    }
  }
}

// grid: (H, B, 1) threadgroups of (32, 1, 1).
template <typename T>
[[kernel]] void mla_decode_merge(
    const device float* part_ml [[buffer(MQ_MLM_PART_ML)]],
    const device float* part_acc [[buffer(MQ_MLM_PART_ACC)]],
    device T* out [[buffer(MQ_MLM_OUT)]], // B x H x R
    constant uint& H [[buffer(MQ_MLM_H)]],
    constant uint& R [[buffer(MQ_MLM_R)]],
    constant uint& nc [[buffer(MQ_MLM_NC)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint h = tgid.x, b = tgid.y;
  float M = -INFINITY;
  for (uint c = 0; c < nc; ++c) {
    M = max(M, part_ml[((ulong(b) * nc + c) * H + h) * 2]);
  }
  float o[MQ_MLA_VPL];
  for (uint k = 0; k < MQ_MLA_VPL; ++k) {
    o[k] = 0.0f;
  }
  float L = 0.0f;
  for (uint c = 0; c < nc; ++c) {
    const ulong at = (ulong(b) * nc + c) * H + h;
    const float w = exp(part_ml[at * 2] - M);
    L += w * part_ml[at * 2 + 1];
    for (uint k = 0; k < MQ_MLA_VPL; ++k) {
      const uint i = lane + 32 * k;
      o[k] += i < R ? w * part_acc[at * R + i] : 0.0f;
    }
  }
  for (uint k = 0; k < MQ_MLA_VPL; ++k) {
    const uint i = lane + 32 * k;
    if (i < R) {
      out[(ulong(b) * H + h) * R + i] = T(o[k] / L);
    }
  }
}
