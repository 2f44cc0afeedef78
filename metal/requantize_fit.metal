// The mse fit on the GPU: one thread per output group, the scalar backend of
// requantize_fit.h (the CPU scalar path runs the same code, so the bits agree).
// Launch contract (RequantizeFit::eval_gpu, csrc/requantize/requantize_mse.cpp):
//   buffers: 0 packed (INT4) | w (float), 1 src scales | importance, 2 importance | -,
//            3 wq, 4 scales, 5 biases; constants 6 n_groups, 7 groups_per_row, 8 bits,
//            9 group_size, 10 src_group_size; threadgroups of 64 threads, 1-D.
#include <metal_stdlib>

#include "requantize_fit.h"

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
    const device uint* packed [[buffer(0)]],
    const device SrcT* src_scales [[buffer(1)]],
    const device float* importance [[buffer(2)]],
    device uint* wq [[buffer(3)]],
    device OutT* scales [[buffer(4)]],
    device OutT* biases [[buffer(5)]],
    constant uint& n_groups [[buffer(6)]],
    constant uint& groups_per_row [[buffer(7)]],
    constant uint& bits [[buffer(8)]],
    constant uint& group_size [[buffer(9)]],
    constant uint& src_group_size [[buffer(10)]],
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
    const device SrcT* x [[buffer(0)]],
    const device float* importance [[buffer(1)]],
    device uint* wq [[buffer(3)]],
    device OutT* scales [[buffer(4)]],
    device OutT* biases [[buffer(5)]],
    constant uint& n_groups [[buffer(6)]],
    constant uint& groups_per_row [[buffer(7)]],
    constant uint& bits [[buffer(8)]],
    constant uint& group_size [[buffer(9)]],
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
  template [[host_name("requantize_fit_int4_" #sname "_" #oname)]] [[kernel]]          \
  decltype(requantize_fit_int4<SrcT, OutT>) requantize_fit_int4<SrcT, OutT>;            \
  template [[host_name("quantize_fit_" #sname "_" #oname)]] [[kernel]]                  \
  decltype(quantize_fit<SrcT, OutT>) quantize_fit<SrcT, OutT>;

#define MQ_FIT_OUT(sname, SrcT)                  \
  MQ_INSTANTIATE_FIT(sname, SrcT, float32, float) \
  MQ_INSTANTIATE_FIT(sname, SrcT, float16, half)  \
  MQ_INSTANTIATE_FIT(sname, SrcT, bfloat16, bfloat)

MQ_FIT_OUT(float32, float)
MQ_FIT_OUT(float16, half)
MQ_FIT_OUT(bfloat16, bfloat)
