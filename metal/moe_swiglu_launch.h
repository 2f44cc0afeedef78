// Launch contract of moe_swiglu's two Metal kernels, the one definition shared by the
// kernels (metal/moe_swiglu.{h,metal}), the host dispatch
// (csrc/moe_swiglu/moe_swiglu.cpp, encode_*) and therefore by the emulator tests, which
// execute that host dispatch. Plain macros: the same text is valid MSL and C++.
#pragma once

// Threadgroup: MQ_MOE_SIMDGROUPS simdgroups of MQ_MOE_LANES lanes, shape
// (MQ_MOE_LANES, MQ_MOE_SIMDGROUPS, 1); a simdgroup computes MQ_MOE_ROWS_PER_SIMDGROUP
// output rows, a threadgroup MQ_MOE_ROWS_PER_TG.
#define MQ_MOE_LANES 32
#define MQ_MOE_SIMDGROUPS 4
#define MQ_MOE_ROWS_PER_SIMDGROUP 8
#define MQ_MOE_ROWS_PER_TG (MQ_MOE_SIMDGROUPS * MQ_MOE_ROWS_PER_SIMDGROUP)

// moe_gate_up: grid (ceil(I / MQ_MOE_ROWS_PER_TG), T*k, 1) threadgroups.
#define MQ_GU_X 0
#define MQ_GU_IDX 1
#define MQ_GU_GATE_W 2
#define MQ_GU_GATE_S 3
#define MQ_GU_GATE_B 4
#define MQ_GU_UP_W 5
#define MQ_GU_UP_S 6
#define MQ_GU_UP_B 7
#define MQ_GU_H 8
#define MQ_GU_D 9
#define MQ_GU_I 10
#define MQ_GU_K 11
#define MQ_GU_E 12
#define MQ_GU_GATE_GROUP 13
#define MQ_GU_UP_GROUP 14

// moe_down: grid (ceil(D / MQ_MOE_ROWS_PER_TG), T, 1) threadgroups.
#define MQ_DN_H 0
#define MQ_DN_IDX 1
#define MQ_DN_SCORES 2
#define MQ_DN_W 3
#define MQ_DN_S 4
#define MQ_DN_B 5
#define MQ_DN_Y 6
#define MQ_DN_D 7
#define MQ_DN_I 8
#define MQ_DN_K 9
#define MQ_DN_E 10
#define MQ_DN_GROUP 11

// Kernel names: moe_gate_up_<x dtype>_<scales dtype>_b<gate bits>_b<up bits> and
// moe_down_<y dtype>_<scales dtype>_b<down bits>; dtype names as MLX spells them
// (float32, float16, bfloat16). The Metal instantiations spell them with these macros,
// the host with the functions below (same format, next to each other).
#define MQ_MOE_GATE_UP_NAME(tn, sn, bg, bu) "moe_gate_up_" #tn "_" #sn "_b" #bg "_b" #bu
#define MQ_MOE_DOWN_NAME(tn, sn, bd) "moe_down_" #tn "_" #sn "_b" #bd

#ifndef __METAL_VERSION__
#include <string>

namespace moequant::launch {

inline std::string moe_gate_up_name(const std::string& x, const std::string& s, int bg, int bu) {
  return "moe_gate_up_" + x + "_" + s + "_b" + std::to_string(bg) + "_b" + std::to_string(bu);
}

inline std::string moe_down_name(const std::string& y, const std::string& s, int bd) {
  return "moe_down_" + y + "_" + s + "_b" + std::to_string(bd);
}

} // namespace moequant::launch
#endif
