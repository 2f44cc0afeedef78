// The SIMD row kernels for AVX-512 (F, BW, DQ, VBMI) + FMA + F16C (this file is
// compiled with those flags; it is only called after a run-time CPU check).
#include <immintrin.h>

#include "moe_swiglu/moe_rows.h"

namespace moequant::cpu {

namespace {

struct V {
  static constexpr int L = 16;
  static constexpr bool byte_loads = true;
  using F = __m512;
  using I = __m512i;
  static F zero() {
    return _mm512_setzero_ps();
  }
  static F loadf(const float* p) {
    return _mm512_loadu_ps(p);
  }
  static void storef(float* p, F v) {
    _mm512_storeu_ps(p, v);
  }
  static F bcast(const float* p) {
    return _mm512_set1_ps(*p);
  }
  static F add(F a, F b) {
    return _mm512_add_ps(a, b);
  }
  static F fma(F a, F b, F c) {
    return _mm512_fmadd_ps(a, b, c);
  }
  static F cvt(I v) {
    return _mm512_cvtepi32_ps(v);
  }
  static I andi(I a, I b) {
    return _mm512_and_si512(a, b);
  }
  template <int S>
  static I srli(I a) {
    return _mm512_srli_epi32(a, S);
  }
  static I set1i(int v) {
    return _mm512_set1_epi32(v);
  }
  static float hsum(F v) {
    return _mm512_reduce_add_ps(v);
  }
  // Lane l gets group l / (16 / gpb) of the loaded scales (gpb = 2, 4 or 8).
  static I lane_group(int gpb) {
    const int per = gpb > 1 ? 16 / gpb : 16;
    alignas(64) int idx[16];
    for (int l = 0; l < 16; ++l) {
      idx[l] = l / per;
    }
    return _mm512_load_si512(idx);
  }
  static F permf(F v, I idx) {
    return _mm512_permutexvar_ps(idx, v);
  }
  template <SType ST>
  static F load_s(const void* p) {
    if constexpr (ST == SType::f32) {
      return _mm512_loadu_ps(p);
    } else {
      const __m256i v = _mm256_loadu_si256(static_cast<const __m256i*>(p));
      if constexpr (ST == SType::bf16) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
      } else {
        return _mm512_cvtph_ps(v);
      }
    }
  }
  // A 4-byte-lane block from byte `off` (< 4) on, lane l starting at byte 4l + off;
  // in the last block of a row the bytes past the block are not touched.
  static I load_block_at(const uint8_t* p, int off, bool last) {
    return last ? _mm512_maskz_loadu_epi8(~0ull >> off, p + off) : _mm512_loadu_si512(p + off);
  }
  template <int NB>
  static I load_block(const uint8_t* p) {
    if constexpr (NB == 4) {
      return _mm512_loadu_si512(p);
    } else {
      // 48 bytes (the masked load touches nothing past them), then bytes 3l..3l+2 to
      // lane l with its top byte zeroed, in one byte permute.
      const __m512i v = _mm512_maskz_loadu_epi32(0x0FFF, p);
      const __m512i idx = _mm512_set_epi8(
          0, 47, 46, 45, 0, 44, 43, 42, 0, 41, 40, 39, 0, 38, 37, 36,
          0, 35, 34, 33, 0, 32, 31, 30, 0, 29, 28, 27, 0, 26, 25, 24,
          0, 23, 22, 21, 0, 20, 19, 18, 0, 17, 16, 15, 0, 14, 13, 12,
          0, 11, 10, 9, 0, 8, 7, 6, 0, 5, 4, 3, 0, 2, 1, 0);
      return _mm512_maskz_permutexvar_epi8(0x7777777777777777ull, idx, v);
    }
  }
};

#include "moe_swiglu/moe_rows_simd.inc"

} // namespace

RowsFn rows_avx512(int bits, SType s) {
  return pick_simd<V>(bits, s);
}

} // namespace moequant::cpu
