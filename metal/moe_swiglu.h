// Metal kernels of moe_swiglu; the CPU twin is csrc/moe_swiglu/moe_swiglu_cpu.cpp.
//
// Two launches per call:
//   A  moe_gate_up: for every (token, expert) pair and a tile of rows of I, the gate
//      and up rows, reading the token's x once for both, then h = silu(g) * u.
//   B  moe_down: for a token and a tile of rows of D, the down rows of all k experts
//      of that token against their h, times the scores, summed over the k experts
//      inside the kernel; writes y.
// Layout (both; the numbers are the launch contract, metal/moe_swiglu_launch.h): a
// threadgroup is MQ_SG simdgroups x 32 lanes; a simdgroup computes MQ_RPS output rows. Each lane takes 32 consecutive codes of the input dimension per
// step (B whole uint32 words for B-bit codes, so 3/5/6-bit rows are read as words
// too), a simdgroup 1024 codes per step. A lane's 32 codes lie in one affine group
// (group sizes are 32, 64, 128), so with s, b the group's parameters
//   sum_i v_i (s q_i + b) = s * sum_i v_i q_i + b * sum_i v_i
// and sum_i v_i is shared by every row. Accumulation is in float; simd_sum reduces
// the lanes. Rows past the end of a ragged tile recompute the last row and are not
// stored, so every lane reaches every simd_sum.
#pragma once

#include "moe_swiglu_launch.h"
#include "quant_math.h"

#define MQ_SG MQ_MOE_SIMDGROUPS
#define MQ_RPS MQ_MOE_ROWS_PER_SIMDGROUP
#define MQ_VPT 32

// A lane's partial dot of one row with its 32 vector values v (group sum vsum).
template <int B, typename S>
inline float mq_lane_dot(
    const device uint* wrow, // the row's packed words
    const device S* srow, // the row's scales
    const device S* brow, // the row's biases
    uint c0, // first code of this lane's chunk
    uint group_size,
    thread const float* v,
    float vsum) {
  uint w[B];
  const device uint* p = wrow + (c0 / 32) * B;
  for (int i = 0; i < B; ++i) {
    w[i] = p[i];
  }
  float acc = 0.0f;
  for (int i = 0; i < MQ_VPT; ++i) {
    acc += v[i] * float(mq_unpack<B>(w, i));
  }
  const uint g = c0 / group_size;
  return float(srow[g]) * acc + float(brow[g]) * vsum;
}

// grid: (ceil(I / MQ_MOE_ROWS_PER_TG), T*k, 1) threadgroups of (32, MQ_SG, 1).
template <typename T, typename S, int BG, int BU>
[[kernel]] void moe_gate_up(
    const device T* x [[buffer(MQ_GU_X)]], // T x D
    const device uint* idx [[buffer(MQ_GU_IDX)]], // T x k
    const device uint* gw [[buffer(MQ_GU_GATE_W)]], // E x I x D*BG/32
    const device S* gs [[buffer(MQ_GU_GATE_S)]], // E x I x D/G_gate
    const device S* gb [[buffer(MQ_GU_GATE_B)]],
    const device uint* uw [[buffer(MQ_GU_UP_W)]], // E x I x D*BU/32
    const device S* us [[buffer(MQ_GU_UP_S)]], // E x I x D/G_up
    const device S* ub [[buffer(MQ_GU_UP_B)]],
    device float* h [[buffer(MQ_GU_H)]], // T x k x I
    constant uint& D [[buffer(MQ_GU_D)]],
    constant uint& I [[buffer(MQ_GU_I)]],
    constant uint& k [[buffer(MQ_GU_K)]],
    constant uint& E [[buffer(MQ_GU_E)]],
    constant uint& g_gate [[buffer(MQ_GU_GATE_GROUP)]],
    constant uint& g_up [[buffer(MQ_GU_UP_GROUP)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint pair = tgid.y;
  const uint t = pair / k;
  const uint e = idx[pair];
  const uint row0 = (tgid.x * MQ_SG + sg) * MQ_RPS;
  if (e >= E || row0 >= I) {
    // Whole simdgroup leaves together (uniform). An out-of-range expert id is never
    // read; its h rows are NaN, and moe_down makes the token's y row NaN (README:
    // "Out-of-range expert ids").
    if (e >= E && lane == 0) {
      for (uint r = row0; r < min(row0 + MQ_RPS, I); ++r) {
        h[pair * I + r] = NAN;
      }
    }
    return;
  }
  const device T* xt = x + ulong(t) * D;
  const ulong gw_row = ulong(D) * BG / 32;
  const ulong uw_row = ulong(D) * BU / 32;
  const uint g_ng = D / g_gate;
  const uint u_ng = D / g_up;

  float ag[MQ_RPS] = {0.0f};
  float au[MQ_RPS] = {0.0f};
  for (uint c0 = lane * MQ_VPT; c0 < D; c0 += 32 * MQ_VPT) {
    float v[MQ_VPT];
    float vsum = 0.0f;
    for (int i = 0; i < MQ_VPT; ++i) {
      v[i] = float(xt[c0 + i]);
      vsum += v[i];
    }
    for (int r = 0; r < MQ_RPS; ++r) {
      const ulong row = ulong(e) * I + min(row0 + r, I - 1);
      ag[r] += mq_lane_dot<BG, S>(
          gw + row * gw_row, gs + row * g_ng, gb + row * g_ng, c0, g_gate, v, vsum);
      au[r] += mq_lane_dot<BU, S>(
          uw + row * uw_row, us + row * u_ng, ub + row * u_ng, c0, g_up, v, vsum);
    }
  }
  for (int r = 0; r < MQ_RPS; ++r) {
    const float g = simd_sum(ag[r]);
    const float u = simd_sum(au[r]);
    if (lane == 0 && row0 + r < I) {
      h[ulong(pair) * I + row0 + r] = g / (1.0f + metal::precise::exp(-g)) * u;
    }
  }
}

// grid: (ceil(D / MQ_MOE_ROWS_PER_TG), T, 1) threadgroups of (32, MQ_SG, 1).
template <typename T, typename S, int BD>
[[kernel]] void moe_down(
    const device float* h [[buffer(MQ_DN_H)]], // T x k x I
    const device uint* idx [[buffer(MQ_DN_IDX)]], // T x k
    const device float* scores [[buffer(MQ_DN_SCORES)]], // T x k
    const device uint* dw [[buffer(MQ_DN_W)]], // E x D x I*BD/32
    const device S* ds [[buffer(MQ_DN_S)]], // E x D x I/G
    const device S* db [[buffer(MQ_DN_B)]],
    device T* y [[buffer(MQ_DN_Y)]], // T x D
    constant uint& D [[buffer(MQ_DN_D)]],
    constant uint& I [[buffer(MQ_DN_I)]],
    constant uint& k [[buffer(MQ_DN_K)]],
    constant uint& E [[buffer(MQ_DN_E)]],
    constant uint& group_size [[buffer(MQ_DN_GROUP)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint t = tgid.y;
  const uint row0 = (tgid.x * MQ_SG + sg) * MQ_RPS;
  if (row0 >= D) {
    return;
  }
  const ulong w_row = ulong(I) * BD / 32;
  const uint ng = I / group_size;
  float acc[MQ_RPS] = {0.0f};
  bool bad_id = false; // an out-of-range expert id: the token's row is NaN
  for (uint j = 0; j < k; ++j) {
    const uint pair = t * k + j;
    const uint e = idx[pair];
    if (e >= E) {
      bad_id = true;
      continue; // uniform across the threadgroup
    }
    const float score = scores[pair];
    const device float* hp = h + ulong(pair) * I;
    float part[MQ_RPS] = {0.0f};
    for (uint c0 = lane * MQ_VPT; c0 < I; c0 += 32 * MQ_VPT) {
      float v[MQ_VPT];
      float vsum = 0.0f;
      for (int i = 0; i < MQ_VPT; ++i) {
        v[i] = hp[c0 + i];
        vsum += v[i];
      }
      for (int r = 0; r < MQ_RPS; ++r) {
        const ulong row = ulong(e) * D + min(row0 + r, D - 1);
        part[r] += mq_lane_dot<BD, S>(
            dw + row * w_row, ds + row * ng, db + row * ng, c0, group_size, v, vsum);
      }
    }
    for (int r = 0; r < MQ_RPS; ++r) {
      acc[r] += score * part[r];
    }
  }
  for (int r = 0; r < MQ_RPS; ++r) {
    const float s = simd_sum(acc[r]);
    if (lane == 0 && row0 + r < D) {
      y[ulong(t) * D + row0 + r] = T(bad_id ? NAN : s);
    }
  }
}
