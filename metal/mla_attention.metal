// Instantiations only; the kernels live in mla_attention.h.
#include <metal_stdlib>

using namespace metal;

#include "mla_attention.h"

// Names: MQ_MLA_PARTIAL_NAME / MQ_MLA_MERGE_NAME (mla_attention_launch.h).
#define MLA_INST_PARTIAL(tn, T, sn, S, b)                                \
  template [[host_name(MQ_MLA_PARTIAL_NAME(tn, sn, b))]] [[kernel]]     \
  decltype(mla_decode_partial<T, S, b>) mla_decode_partial<T, S, b>;

#define MLA_INST_MERGE(tn, T)                                \
  template [[host_name(MQ_MLA_MERGE_NAME(tn))]] [[kernel]]  \
  decltype(mla_decode_merge<T>) mla_decode_merge<T>;

#define MLA_INST_SCALES(tn, T, sn, S) \
  MLA_INST_PARTIAL(tn, T, sn, S, 4)   \
  MLA_INST_PARTIAL(tn, T, sn, S, 8)

#define MLA_INST_Q(tn, T)                   \
  MLA_INST_SCALES(tn, T, float32, float)    \
  MLA_INST_SCALES(tn, T, float16, half)     \
  MLA_INST_SCALES(tn, T, bfloat16, bfloat)  \
  MLA_INST_MERGE(tn, T)

MLA_INST_Q(float32, float)
MLA_INST_Q(float16, half)
MLA_INST_Q(bfloat16, bfloat)
