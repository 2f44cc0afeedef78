// The SIMD row kernels for AVX-512 (F, BW, DQ, VBMI) + FMA + F16C (this file is
// compiled with those flags; it is only called after a run-time CPU check).
#include <immintrin.h>

#include <type_traits>

#include "moe_swiglu/moe_rows.h"

namespace moequant::cpu {

namespace {

#include "moe_swiglu/moe_rows_avx512_v.inc"

#include "moe_swiglu/moe_rows_simd.inc"

} // namespace

RowsFn rows_avx512(int bits, SType s) {
  return pick_simd<V>(bits, s);
}

} // namespace moequant::cpu
