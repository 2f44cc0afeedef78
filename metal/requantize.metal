// Instantiations only; the kernel lives in requantize.h.
#include <metal_stdlib>

#include "requantize.h"

using namespace metal;

#define MQ_INSTANTIATE_REQUANT(sname, SrcT, oname, OutT, bits, g, sg)              \
  template [[host_name(MQ_RQ_NAME(bits, g, sg, sname, oname))]] [[kernel]]        \
      decltype(requantize_int4<SrcT, OutT, bits, g, sg>)                           \
      requantize_int4<SrcT, OutT, bits, g, sg>;

#define MQ_REQUANT_OUT(sname, SrcT, bits, g, sg)                      \
  MQ_INSTANTIATE_REQUANT(sname, SrcT, float32, float, bits, g, sg)    \
  MQ_INSTANTIATE_REQUANT(sname, SrcT, float16, half, bits, g, sg)     \
  MQ_INSTANTIATE_REQUANT(sname, SrcT, bfloat16, bfloat, bits, g, sg)

#define MQ_REQUANT_SRC(bits, g, sg)               \
  MQ_REQUANT_OUT(float32, float, bits, g, sg)     \
  MQ_REQUANT_OUT(float16, half, bits, g, sg)      \
  MQ_REQUANT_OUT(bfloat16, bfloat, bits, g, sg)

#define MQ_REQUANT_SG(bits, g)   \
  MQ_REQUANT_SRC(bits, g, 32)    \
  MQ_REQUANT_SRC(bits, g, 64)    \
  MQ_REQUANT_SRC(bits, g, 128)

#define MQ_REQUANT_BITS(bits) \
  MQ_REQUANT_SG(bits, 32)     \
  MQ_REQUANT_SG(bits, 64)     \
  MQ_REQUANT_SG(bits, 128)

MQ_REQUANT_BITS(2)
MQ_REQUANT_BITS(3)
MQ_REQUANT_BITS(4)
MQ_REQUANT_BITS(5)
MQ_REQUANT_BITS(6)
MQ_REQUANT_BITS(8)
