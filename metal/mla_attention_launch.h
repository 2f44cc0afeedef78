// Launch contract of mla_decode_attention's two Metal kernels, the one definition shared
// by the kernels (metal/mla_attention.{h,metal}), the host dispatch
// (csrc/mla_attention/mla_attention.cpp, encode_*) and therefore the emulator tests,
// which execute that host dispatch. Plain macros: the same text is valid MSL and C++.
#pragma once

// mla_decode_partial: threadgroups of (32, MQ_MLA_SG, 1), one head per simdgroup; rows
// are dequantized into threadgroup memory MQ_MLA_TB positions at a time. Grid
// (num_chunks, ceil(H / MQ_MLA_SG), B).
#define MQ_MLA_SG 4
#define MQ_MLA_TB 8
// Values per lane of the latent (R <= 32 * MQ_MLA_VPL) and rope (DR <= 32 *
// MQ_MLA_VPL_PE) parts, and the threadgroup row (R + DR <= MQ_MLA_ROW). The host refuses
// shapes past these limits before any launch.
#define MQ_MLA_VPL 16
#define MQ_MLA_VPL_PE 4
#define MQ_MLA_ROW 640
// Positions per chunk (a multiple of MQ_MLA_TB): at least MQ_MLA_MIN_CHUNK, and at most
// MQ_MLA_MAX_CHUNKS chunks per batch row (mla_metal_chunk below).
#define MQ_MLA_MIN_CHUNK 256
#define MQ_MLA_MAX_CHUNKS 256

#define MQ_MLA_Q_LAT 0
#define MQ_MLA_Q_PE 1
#define MQ_MLA_LAT_W 2
#define MQ_MLA_LAT_S 3
#define MQ_MLA_LAT_B 4
#define MQ_MLA_PE_W 5
#define MQ_MLA_PE_S 6
#define MQ_MLA_PE_B 7
#define MQ_MLA_PART_ML 8
#define MQ_MLA_PART_ACC 9
#define MQ_MLA_H 10
#define MQ_MLA_T 11
#define MQ_MLA_R 12
#define MQ_MLA_DR 13
#define MQ_MLA_GS 14
#define MQ_MLA_CHUNK 15
#define MQ_MLA_SCALE 16

// mla_decode_merge: grid (H, B, 1) threadgroups of (32, 1, 1).
#define MQ_MLM_PART_ML 0
#define MQ_MLM_PART_ACC 1
#define MQ_MLM_OUT 2
#define MQ_MLM_H 3
#define MQ_MLM_R 4
#define MQ_MLM_NC 5

// Kernel names: mla_decode_partial_<q dtype>_<scales dtype>_b<bits> and
// mla_decode_merge_<out dtype>, dtype names as MLX spells them.
#define MQ_MLA_PARTIAL_NAME(tn, sn, b) "mla_decode_partial_" #tn "_" #sn "_b" #b
#define MQ_MLA_MERGE_NAME(tn) "mla_decode_merge_" #tn

#ifndef __METAL_VERSION__
#include <algorithm>
#include <string>

namespace moequant::launch {

inline std::string mla_decode_partial_name(const std::string& q, const std::string& s, int bits) {
  return "mla_decode_partial_" + q + "_" + s + "_b" + std::to_string(bits);
}

inline std::string mla_decode_merge_name(const std::string& out) {
  return "mla_decode_merge_" + out;
}

// Positions per chunk of a T-position cache.
inline int mla_metal_chunk(int T) {
  const int len = std::max(MQ_MLA_MIN_CHUNK, (T + MQ_MLA_MAX_CHUNKS - 1) / MQ_MLA_MAX_CHUNKS);
  return (len + MQ_MLA_TB - 1) / MQ_MLA_TB * MQ_MLA_TB;
}

} // namespace moequant::launch
#endif
