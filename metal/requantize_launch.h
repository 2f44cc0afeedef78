// Launch contract of the requantize_int4 Metal kernel, the one definition shared by the
// kernel (metal/requantize.{h,metal}), the host dispatch (csrc/requantize/requantize.cpp,
// encode_requantize_int4) and therefore the emulator tests, which execute that host
// dispatch. Plain macros: the same text is valid MSL and C++.
#pragma once

// One thread per output group; 1-D threadgroups of MQ_RQ_THREADS threads, grid
// (ceil(n_groups / MQ_RQ_THREADS), 1, 1); threads past n_groups return at once.
#define MQ_RQ_THREADS 256

#define MQ_RQ_PACKED 0
#define MQ_RQ_SRC_SCALES 1
#define MQ_RQ_WQ 2
#define MQ_RQ_SCALES 3
#define MQ_RQ_BIASES 4
#define MQ_RQ_N_GROUPS 5
#define MQ_RQ_GROUPS_PER_ROW 6

// requantize_int4_b<bits>_g<group>_sg<source group>_<source scales dtype>_<output dtype>,
// dtype names as MLX spells them. Metal spells it with the macro, the host with the
// function below.
#define MQ_RQ_NAME(bits, g, sg, sname, oname) \
  "requantize_int4_b" #bits "_g" #g "_sg" #sg "_" #sname "_" #oname

#ifndef __METAL_VERSION__
#include <string>

namespace moequant::launch {

inline std::string requantize_int4_name(
    int bits, int g, int sg, const std::string& src, const std::string& out) {
  return "requantize_int4_b" + std::to_string(bits) + "_g" + std::to_string(g) + "_sg" +
      std::to_string(sg) + "_" + src + "_" + out;
}

} // namespace moequant::launch
#endif
