// mq_div_rn (metal/quant_math.h) on its own: out[i] = a[i] / b[i], correctly rounded,
// for the inexact-division test in tests/test_metal_requantize.py.
#include <metal_stdlib>

#include "quant_math.h"

using namespace metal;

[[kernel]] void div_rn(
    const device float* a [[buffer(0)]],
    const device float* b [[buffer(1)]],
    device float* out [[buffer(2)]],
    constant uint& n [[buffer(3)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid < n) {
    out[gid] = mq_div_rn(a[gid], b[gid]);
  }
}
