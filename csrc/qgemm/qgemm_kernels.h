// The per-instruction-set pieces of the quantized GEMM (qgemm.cpp drives them): plain
// types only, so translation units compiled for different ISAs can include it.
#pragma once

#include <cstdint>

#include "common/quant_formats.h"

namespace moequant::qgemm {

// Rows of x per packed block (the micro-kernel's row count; m0 in gemm must be a
// multiple of it).
constexpr int kRowBlock = 16;

namespace detail {

// Rows of W per micro-tile (the micro-kernel's output columns).
constexpr int kNR = 6;

// Decodes kc codes of one row (kc a multiple of G, w at the first code of a group) to
// floats: dst[k] = s[k / G] * q_k + b[k / G].
using DecodeFn =
    void (*)(const uint8_t* w, const float* s, const float* b, int kc, int G, float* dst);

// c[j * ldc + i] (+= if accumulate, else =) sum_{k < kc} xb[k * kRowBlock + i] *
// wd[j * ldw + k], for j < kNR and i < 16 (rows16) or i < 8 (rows8).
using KernelFn = void (*)(
    const float* xb,
    const float* wd,
    int64_t ldw,
    int kc,
    float* c,
    int64_t ldc,
    bool accumulate);

// A kernel template instantiated for the run-time bit width: pick<F>(bits) returns
// F<B> (a function pointer) for B in 2/3/4/5/6/8, null for other widths.
template <template <int> class F>
auto pick_bits(int bits) -> decltype(F<2>::fn) {
  using Fn = decltype(F<2>::fn);
  return dispatch_bits(
      bits, [](auto b) -> Fn { return F<decltype(b)::value>::fn; }, []() -> Fn { return nullptr; });
}

struct Kernels {
  DecodeFn decode;
  KernelFn rows16;
  KernelFn rows8;
};

Kernels kernels_scalar(int bits);
#if defined(__x86_64__) || defined(_M_X64)
Kernels kernels_avx2(int bits); // qgemm_avx2.cpp (compiled with AVX2, FMA)
// iters x 12 dependent-chain-free 8-lane FMAs (the FMA-peak probe's loop).
double fma_probe_avx2(long iters);
#endif

} // namespace detail

} // namespace moequant::qgemm
