// Metal kernel: compressed-tensors INT4 -> MLX affine, one thread per output group.
//
// The twin of csrc/requantize/requantize_cpu.cpp; both take their arithmetic from
// quant_math.h, so GPU and CPU results are bit-identical by construction (MLX's own
// GPU quantizer rounds half away from zero and starts its max at 0, so it is not).
#pragma once

#include "quant_math.h"
#include "requantize_launch.h"

// packed:     rows x K/8 words, nibble u = q + 8, element i of a word at bits 4i
// src_scales: rows x K/SG
// wq:         rows x K*BITS/32 words (MLX bitstream)
// scales, biases: rows x K/G
// A thread reads its group's G/8 words and its source scales once, into registers
// (at most 16 words and 4 scales), so device memory sees each input byte once.
// Output words are written whole.
template <typename SrcT, typename OutT, int BITS, int G, int SG>
[[kernel]] void requantize_int4(
    const device uint* packed [[buffer(MQ_RQ_PACKED)]],
    const device SrcT* src_scales [[buffer(MQ_RQ_SRC_SCALES)]],
    device uint* wq [[buffer(MQ_RQ_WQ)]],
    device OutT* scales [[buffer(MQ_RQ_SCALES)]],
    device OutT* biases [[buffer(MQ_RQ_BIASES)]],
    constant uint& n_groups [[buffer(MQ_RQ_N_GROUPS)]],
    constant uint& groups_per_row [[buffer(MQ_RQ_GROUPS_PER_ROW)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid >= n_groups) {
    return;
  }
  // Words per source scale within this group: a scale covers SG/8 words, or the whole
  // group when the source group is the larger one.
  constexpr int WORDS = G / 8;
  constexpr int WORDS_PER_SCALE = (SG < G ? SG : G) / 8;
  constexpr int N_SCALES = WORDS / WORDS_PER_SCALE;
  const float n_bins = float((1 << BITS) - 1);
  const uint row = gid / groups_per_row;
  const uint g = gid % groups_per_row;
  const ulong K = ulong(groups_per_row) * G;
  const device uint* w = packed + row * (K / 8) + ulong(g) * WORDS;
  const device SrcT* ss = src_scales + row * (K / SG) + (ulong(g) * G) / SG;

  uint words[WORDS];
  float sc[N_SCALES];
  for (int j = 0; j < N_SCALES; ++j) {
    sc[j] = float(ss[j]);
  }
  // Pass 1: the group's range, with the comparison order of MLX's CPU loop.
  float wmin = INFINITY;
  float wmax = -INFINITY;
  for (int i = 0; i < WORDS; ++i) {
    words[i] = w[i];
    const float s = sc[i / WORDS_PER_SCALE];
    for (int k = 0; k < 8; ++k) {
      const float v = float(int((words[i] >> (4 * k)) & 0xFu) - MQ_INT4_OFFSET) * s;
      wmin = v < wmin ? v : wmin;
      wmax = wmax < v ? v : wmax;
    }
  }
  const mq_affine p = mq_affine_params(wmin, wmax, n_bins);
  scales[gid] = OutT(p.scale);
  biases[gid] = OutT(p.bias);

  // Pass 2: codes, eight at a time into BITS bytes, flushed as whole 32-bit words.
  device uint* out = wq + row * (K * BITS / 32) + ulong(g) * (G * BITS / 32);
  ulong acc = 0;
  int n_acc = 0;
  int n_out = 0;
  for (int i = 0; i < WORDS; ++i) {
    const float s = sc[i / WORDS_PER_SCALE];
    ulong codes = 0;
    for (int k = 0; k < 8; ++k) {
      const float v = float(int((words[i] >> (4 * k)) & 0xFu) - MQ_INT4_OFFSET) * s;
      codes |= ulong(mq_affine_code(v, p, n_bins)) << (8 * k);
    }
    acc |= mq_pack8<BITS>(codes) << n_acc;
    n_acc += 8 * BITS;
    while (n_acc >= 32) {
      out[n_out++] = uint(acc & 0xFFFFFFFFul);
      acc >>= 32;
      n_acc -= 32;
    }
  }
}
