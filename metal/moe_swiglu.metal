// Instantiations only; the kernels live in moe_swiglu.h.
#include <metal_stdlib>

using namespace metal;

#include "moe_swiglu.h"

// moe_gate_up_<x dtype>_<scales dtype>_b<gate bits>_b<up bits>
#define MQ_INST_GATE_UP(tn, T, sn, S, bg, bu)                                      \
  template [[host_name("moe_gate_up_" #tn "_" #sn "_b" #bg "_b" #bu)]] [[kernel]] \
  decltype(moe_gate_up<T, S, bg, bu>) moe_gate_up<T, S, bg, bu>;

// moe_down_<y dtype>_<scales dtype>_b<down bits>
#define MQ_INST_DOWN(tn, T, sn, S, bd)                                      \
  template [[host_name("moe_down_" #tn "_" #sn "_b" #bd)]] [[kernel]]      \
  decltype(moe_down<T, S, bd>) moe_down<T, S, bd>;

#define MQ_GU_UP(tn, T, sn, S, bg) \
  MQ_INST_GATE_UP(tn, T, sn, S, bg, 2) \
  MQ_INST_GATE_UP(tn, T, sn, S, bg, 3) \
  MQ_INST_GATE_UP(tn, T, sn, S, bg, 4) \
  MQ_INST_GATE_UP(tn, T, sn, S, bg, 5) \
  MQ_INST_GATE_UP(tn, T, sn, S, bg, 6) \
  MQ_INST_GATE_UP(tn, T, sn, S, bg, 8)

#define MQ_ALL_BITS(tn, T, sn, S) \
  MQ_GU_UP(tn, T, sn, S, 2)       \
  MQ_GU_UP(tn, T, sn, S, 3)       \
  MQ_GU_UP(tn, T, sn, S, 4)       \
  MQ_GU_UP(tn, T, sn, S, 5)       \
  MQ_GU_UP(tn, T, sn, S, 6)       \
  MQ_GU_UP(tn, T, sn, S, 8)       \
  MQ_INST_DOWN(tn, T, sn, S, 2)   \
  MQ_INST_DOWN(tn, T, sn, S, 3)   \
  MQ_INST_DOWN(tn, T, sn, S, 4)   \
  MQ_INST_DOWN(tn, T, sn, S, 5)   \
  MQ_INST_DOWN(tn, T, sn, S, 6)   \
  MQ_INST_DOWN(tn, T, sn, S, 8)

#define MQ_ALL_SCALES(tn, T)              \
  MQ_ALL_BITS(tn, T, float32, float)      \
  MQ_ALL_BITS(tn, T, float16, half)       \
  MQ_ALL_BITS(tn, T, bfloat16, bfloat)

MQ_ALL_SCALES(float32, float)
MQ_ALL_SCALES(float16, half)
MQ_ALL_SCALES(bfloat16, bfloat)
