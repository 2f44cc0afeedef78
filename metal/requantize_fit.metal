// The mse fit on the GPU: one thread per output group, the scalar backend of
// requantize_fit.h (the CPU scalar path runs the same code, so the bits agree).
// Launch contract: requantize_fit_launch.h (RequantizeFit::encode dispatches it).
#include <metal_stdlib>

#include "requantize_fit.h"
#include "requantize_fit_launch.h"

using namespace metal;

// Codes (bytes < 2^bits) -> MLX's bitstream, whole 32-bit words (n * bits % 32 == 0).
inline void mq_fit_store(thread const uchar* q, int n, int bits, device uint* out) {
  ulong acc = 0;
  int na = 0;
  int w = 0;
  for (int i = 0; i < n; ++i) {
    acc |= ulong(q[i]) << na;
    na += bits;
    if (na >= 32) {
      out[w++] = uint(acc & 0xFFFFFFFFul);
      acc >>= 32;
      na -= 32;
    }
  }
}

template <typename SrcT, typename OutT>
[[kernel]] void requantize_fit_int4(
    const device uint* packed [[buffer(MQ_FIT_PACKED)]],
    const device SrcT* src_scales [[buffer(MQ_FIT_SRC_SCALES)]],
    const device float* importance [[buffer(MQ_FIT_INT4_IMPORTANCE)]],
    device uint* wq [[buffer(MQ_FIT_WQ)]],
    device OutT* scales [[buffer(MQ_FIT_SCALES)]],
    device OutT* biases [[buffer(MQ_FIT_BIASES)]],
    constant uint& n_groups [[buffer(MQ_FIT_N_GROUPS)]],
    constant uint& groups_per_row [[buffer(MQ_FIT_GROUPS_PER_ROW)]],
    constant uint& bits [[buffer(MQ_FIT_BITS)]],
    constant uint& group_size [[buffer(MQ_FIT_GROUP_SIZE)]],
    constant uint& src_group_size [[buffer(MQ_FIT_SRC_GROUP_SIZE)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid >= n_groups) {
    return;
  }
  const uint G = group_size;
  const uint row = gid / groups_per_row;
  const uint g = gid % groups_per_row;
  const ulong K = ulong(groups_per_row) * G;
  // The group's words in registers: device memory sees each input byte once.
  const device uint* wp = packed + row * (K / 8) + ulong(g) * (G / 8);
  uint w[MQ_FIT_MAX_SLOTS / 8];
  for (uint i = 0; i < G / 8; ++i) {
    w[i] = wp[i];
  }
  const device SrcT* ss = src_scales + row * (K / src_group_size);
  const device float* h = importance + ulong(g) * G;
  mq_fit_slots s;
  bool present[MQ_FIT_MAX_SLOTS];
  const int nblk = int(G / 32);
  s.n = 16 * nblk;
  for (int b = 0; b < nblk; ++b) {
    const float sc = float(ss[(ulong(g) * G + 32 * b) / src_group_size]);
    int cnt[16];
    float c[16];
    for (int u = 0; u < 16; ++u) {
      cnt[u] = 0;
      c[u] = 0.0f;
    }
    for (int k = 0; k < 32; ++k) {
      const uint u = (w[4 * b + k / 8] >> (4 * (k % 8))) & 0xFu;
      cnt[u] += 1;
      c[u] = c[u] + h[32 * b + k];
    }
    for (int u = 0; u < 16; ++u) {
      s.v[16 * b + u] = float(u - MQ_INT4_OFFSET) * sc;
      s.c[16 * b + u] = c[u];
      present[16 * b + u] = cnt[u] > 0;
    }
  }
  const mq_fit_result r =
      mq_fit_group<OutT, mq_tbits<OutT>, mq_fit_scalar<OutT>>(s, present, int(bits));
  scales[gid] = OutT(r.scale);
  biases[gid] = OutT(r.bias);
  const float nb = float((1u << bits) - 1u);
  uchar codes[MQ_FIT_MAX_SLOTS];
  for (int b = 0; b < nblk; ++b) {
    uchar lut[16];
    for (int u = 0; u < 16; ++u) {
      lut[u] = uchar(mq_fit_code(r, s.v[16 * b + u], nb));
    }
    for (int k = 0; k < 32; ++k) {
      codes[32 * b + k] = lut[(w[4 * b + k / 8] >> (4 * (k % 8))) & 0xFu];
    }
  }
  mq_fit_store(codes, int(G), int(bits), wq + ulong(gid) * (G * bits / 32));
}

template <typename SrcT, typename OutT>
[[kernel]] void quantize_fit(
    const device SrcT* x [[buffer(MQ_FIT_W)]],
    const device float* importance [[buffer(MQ_FIT_FLOAT_IMPORTANCE)]],
    device uint* wq [[buffer(MQ_FIT_WQ)]],
    device OutT* scales [[buffer(MQ_FIT_SCALES)]],
    device OutT* biases [[buffer(MQ_FIT_BIASES)]],
    constant uint& n_groups [[buffer(MQ_FIT_N_GROUPS)]],
    constant uint& groups_per_row [[buffer(MQ_FIT_GROUPS_PER_ROW)]],
    constant uint& bits [[buffer(MQ_FIT_BITS)]],
    constant uint& group_size [[buffer(MQ_FIT_GROUP_SIZE)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid >= n_groups) {
    return;
  }
  const uint G = group_size;
  const uint g = gid % groups_per_row;
  const device SrcT* w = x + ulong(gid) * G;
  const device float* h = importance + ulong(g) * G;
  mq_fit_slots s;
  bool present[MQ_FIT_MAX_SLOTS];
  s.n = int(G);
  for (uint j = 0; j < G; ++j) {
    s.v[j] = float(w[j]);
    s.c[j] = h[j];
    present[j] = true;
  }
  const mq_fit_result r =
      mq_fit_group<OutT, mq_tbits<OutT>, mq_fit_scalar<OutT>>(s, present, int(bits));
  scales[gid] = OutT(r.scale);
  biases[gid] = OutT(r.bias);
  const float nb = float((1u << bits) - 1u);
  uchar codes[MQ_FIT_MAX_SLOTS];
  for (uint j = 0; j < G; ++j) {
    codes[j] = uchar(mq_fit_code(r, s.v[j], nb));
  }
  mq_fit_store(codes, int(G), int(bits), wq + ulong(gid) * (G * bits / 32));
}

#define MQ_INSTANTIATE_FIT(sname, SrcT, oname, OutT)                                    \
  template [[host_name(MQ_FIT_INT4_NAME(sname, oname))]] [[kernel]]          \
  decltype(requantize_fit_int4<SrcT, OutT>) requantize_fit_int4<SrcT, OutT>;            \
  template [[host_name(MQ_FIT_FLOAT_NAME(sname, oname))]] [[kernel]]                  \
  decltype(quantize_fit<SrcT, OutT>) quantize_fit<SrcT, OutT>;

#define MQ_FIT_OUT(sname, SrcT)                  \
  MQ_INSTANTIATE_FIT(sname, SrcT, float32, float) \
  MQ_INSTANTIATE_FIT(sname, SrcT, float16, half)  \
  MQ_INSTANTIATE_FIT(sname, SrcT, bfloat16, bfloat)

MQ_FIT_OUT(float32, float)
MQ_FIT_OUT(float16, half)
MQ_FIT_OUT(bfloat16, bfloat)
