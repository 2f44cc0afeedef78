// One switch for the AVX2 kernels of every op family outside the row kernels (dense
// matmuls, MLA attention, the quantized GEMM): they run where the row kernels run a SIMD
// path, so MOEQUANT_CPU_PATH=scalar sends every op to its portable twin at once.
#pragma once

#include <cstring>

#include "moe_swiglu/moe_swiglu_cpu.h"

namespace moequant::cpu {

// Every SIMD path of moe_cpu_path (CPU features capped by MOEQUANT_CPU_PATH) implies
// AVX2, FMA and F16C; non-x86 builds report "scalar".
inline bool avx2_kernels_enabled() {
  return std::strcmp(moe_cpu_path(), "scalar") != 0;
}

} // namespace moequant::cpu
