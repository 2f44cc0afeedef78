// Instantiations only; the kernels live in moe_swiglu.h.
#include <metal_stdlib>

using namespace metal;

#include "moe_swiglu.h"

// Names: MQ_MOE_GATE_UP_NAME / MQ_MOE_DOWN_NAME (moe_swiglu_launch.h).
#define MQ_INST_GATE_UP(tn, T, sn, S, bg, bu)                                \
  template [[host_name(MQ_MOE_GATE_UP_NAME(tn, sn, bg, bu))]] [[kernel]] \
  decltype(moe_gate_up<T, S, bg, bu>) moe_gate_up<T, S, bg, bu>;

#define MQ_INST_DOWN(tn, T, sn, S, bd)                              \
  template [[host_name(MQ_MOE_DOWN_NAME(tn, sn, bd))]] [[kernel]] \
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
