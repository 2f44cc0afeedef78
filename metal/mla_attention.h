// Metal kernels of mla_decode_attention; the CPU twin is csrc/mla_attention/.
//
// One decode step of MLA's absorbed attention over a 4/8-bit affine latent cache, in
// two launches:
//   A  mla_decode_partial: a threadgroup takes one chunk of cached positions of one
//      batch row and MLA_SG heads (one per simdgroup). Blocks of MLA_TB rows are
//      dequantized once into threadgroup memory by all threads (each packed word read
//      once per threadgroup), then each simdgroup scores them for its head (lanes split
//      R and DR, simd_sum) and keeps an online softmax (running max m, sum l, and the
//      weighted latent sum acc spread over the lanes). Writes (m, l, acc) per
//      (batch, chunk, head).
//   B  mla_decode_merge: per (batch, head), the chunks merged in chunk order:
//      out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, cast to T.
// Accumulation in float. Limits (checked by the host): R <= 32 * MLA_VPL, DR <= 32 *
// MLA_VPL_PE, R + DR <= MLA_ROW (Kimi/DeepSeek: 512 + 64).
#pragma once

#define MLA_SG 4
#define MLA_TB 8
#define MLA_VPL 16
#define MLA_VPL_PE 4
#define MLA_ROW 640

// grid: (num_chunks, ceil(H / MLA_SG), B) threadgroups of (32, MLA_SG, 1).
template <typename T, typename S, int BITS>
[[kernel]] void mla_decode_partial(
    const device T* q_lat [[buffer(0)]], // B x H x R
    const device T* q_pe [[buffer(1)]], // B x H x DR
    const device uint* lat_w [[buffer(2)]], // B x Tn x R*BITS/32
    const device S* lat_s [[buffer(3)]], // B x Tn x R/gs
    const device S* lat_b [[buffer(4)]],
    const device uint* pe_w [[buffer(5)]], // B x Tn x DR*BITS/32
    const device S* pe_s [[buffer(6)]], // B x Tn x DR/gs
    const device S* pe_b [[buffer(7)]],
    device float* part_ml [[buffer(8)]], // B x nc x H x 2 (m, l)
    device float* part_acc [[buffer(9)]], // B x nc x H x R
    constant uint& H [[buffer(10)]],
    constant uint& Tn [[buffer(11)]],
    constant uint& R [[buffer(12)]],
    constant uint& DR [[buffer(13)]],
    constant uint& gs [[buffer(14)]],
    constant uint& chunk [[buffer(15)]], // positions per chunk (a multiple of MLA_TB)
    constant float& scale [[buffer(16)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float rows[MLA_TB * MLA_ROW];
  const uint c = tgid.x, b = tgid.z;
  const uint h = tgid.y * MLA_SG + sg;
  const bool live = h < H; // uniform per simdgroup; dead ones still reach the barriers
  const uint hq = live ? h : H - 1;
  const uint RW = R * BITS / 32, PW = DR * BITS / 32, VPW = 32 / BITS;
  const uint tid = sg * 32 + lane;
  float ql[MLA_VPL], qp[MLA_VPL_PE], acc[MLA_VPL];
  for (uint k = 0; k < MLA_VPL; ++k) {
    const uint i = lane + 32 * k;
    ql[k] = i < R ? float(q_lat[(ulong(b) * H + hq) * R + i]) : 0.0f;
    acc[k] = 0.0f;
  }
  for (uint k = 0; k < MLA_VPL_PE; ++k) {
    const uint i = lane + 32 * k;
    qp[k] = i < DR ? float(q_pe[(ulong(b) * H + hq) * DR + i]) : 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  const uint t0 = c * chunk, t1 = min(Tn, t0 + chunk);
  for (uint tb = t0; tb < t1; tb += MLA_TB) {
    const uint nb = min(uint(MLA_TB), t1 - tb);
    // Dequantize the block: one packed word per thread and step.
    for (uint j = tid; j < nb * (RW + PW); j += 32 * MLA_SG) {
      const uint r = j / (RW + PW), wi = j % (RW + PW);
      const ulong t = ulong(b) * Tn + tb + r;
      const bool is_lat = wi < RW;
      const uint word = is_lat ? lat_w[t * RW + wi] : pe_w[t * PW + (wi - RW)];
      const uint v0 = (is_lat ? wi : wi - RW) * VPW;
      const uint ng = (is_lat ? R : DR) / gs;
      const ulong gi = t * ng + v0 / gs;
      const float sc = float(is_lat ? lat_s[gi] : pe_s[gi]);
      const float bi = float(is_lat ? lat_b[gi] : pe_b[gi]);
      threadgroup float* dst = rows + r * MLA_ROW + (is_lat ? 0 : R) + v0;
      for (uint k = 0; k < VPW; ++k) {
        dst[k] = float((word >> (k * BITS)) & ((1u << BITS) - 1u)) * sc + bi;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint r = 0; r < nb; ++r) {
      const threadgroup float* row = rows + r * MLA_ROW;
      float part = 0.0f;
      for (uint k = 0; k < MLA_VPL; ++k) {
        const uint i = lane + 32 * k;
        part += i < R ? ql[k] * row[i] : 0.0f;
      }
      for (uint k = 0; k < MLA_VPL_PE; ++k) {
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
      for (uint k = 0; k < MLA_VPL; ++k) {
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
    for (uint k = 0; k < MLA_VPL; ++k) {
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
    const device float* part_ml [[buffer(0)]],
    const device float* part_acc [[buffer(1)]],
    device T* out [[buffer(2)]], // B x H x R
    constant uint& H [[buffer(3)]],
    constant uint& R [[buffer(4)]],
    constant uint& nc [[buffer(5)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint h = tgid.x, b = tgid.y;
  float M = -INFINITY;
  for (uint c = 0; c < nc; ++c) {
    M = max(M, part_ml[((ulong(b) * nc + c) * H + h) * 2]);
  }
  float o[MLA_VPL];
  for (uint k = 0; k < MLA_VPL; ++k) {
    o[k] = 0.0f;
  }
  float L = 0.0f;
  for (uint c = 0; c < nc; ++c) {
    const ulong at = (ulong(b) * nc + c) * H + h;
    const float w = exp(part_ml[at * 2] - M);
    L += w * part_ml[at * 2 + 1];
    for (uint k = 0; k < MLA_VPL; ++k) {
      const uint i = lane + 32 * k;
      o[k] += i < R ? w * part_acc[at * R + i] : 0.0f;
    }
  }
  for (uint k = 0; k < MLA_VPL; ++k) {
    const uint i = lane + 32 * k;
    if (i < R) {
      out[(ulong(b) * H + h) * R + i] = T(o[k] / L);
    }
  }
}
