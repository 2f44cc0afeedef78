// The SIMD row kernels for AVX2 + FMA + F16C, float and integer (moe_rows_avx2int.inc) (this file
// is compiled with those flags; it is only called after a run-time CPU check).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "moe_swiglu/moe_rows.h"

namespace moequant::cpu {

namespace {

struct V {
  static constexpr int L = 8;
  static constexpr bool byte_loads = false; // only code 0 is table-decoded
  using F = __m256;
  using I = __m256i;
  static F zero() {
    return _mm256_setzero_ps();
  }
  static F loadf(const float* p) {
    return _mm256_loadu_ps(p);
  }
  static void storef(float* p, F v) {
    _mm256_storeu_ps(p, v);
  }
  static F bcast(const float* p) {
    return _mm256_broadcast_ss(p);
  }
  static F add(F a, F b) {
    return _mm256_add_ps(a, b);
  }
  static F fma(F a, F b, F c) {
    return _mm256_fmadd_ps(a, b, c);
  }
  static F cvt(I v) {
    return _mm256_cvtepi32_ps(v);
  }
  static I andi(I a, I b) {
    return _mm256_and_si256(a, b);
  }
  template <int S>
  static I srli(I a) {
    return _mm256_srli_epi32(a, S);
  }
  static I set1i(int v) {
    return _mm256_set1_epi32(v);
  }
  static float hsum(F v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
  }
  // Lane l gets group l / (8 / gpb) of the loaded scales (gpb = 2 or 4).
  static I lane_group(int gpb) {
    return gpb == 4 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                    : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  }
  static F permf(F v, I idx) {
    return _mm256_permutevar8x32_ps(v, idx);
  }
  template <SType ST>
  static F load_s(const void* p) {
    if constexpr (ST == SType::f32) {
      return _mm256_loadu_ps(static_cast<const float*>(p));
    } else {
      const __m128i v = _mm_loadu_si128(static_cast<const __m128i*>(p));
      if constexpr (ST == SType::bf16) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
      } else {
        return _mm256_cvtph_ps(v);
      }
    }
  }
  // 24 bytes to 3 bytes per lane (top byte zero): bytes 0..11 to the low half's lanes,
  // 12..23 to the high half's. `wide` (a block with a neighbour on each side in its row):
  // one 32-byte load from 4 bytes before the block (bytes 0..11 at offsets 4..15 of the
  // low half, 12..23 at 0..11 of the high half); otherwise two 16-byte loads inside the
  // block, bytes 0..15 to the low half and 8..23 to the high half (12..23 at offsets
  // 4..15), one instruction more (a masked load and a lane-crossing permute cost more on
  // AMD Zen).
  template <int NB, bool wide = false>
  static I load_block(const uint8_t* p) {
    if constexpr (NB == 4) {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    } else {
#define MQ_LANES3(lo, hi)                                                                         \
  lo + 0, lo + 1, lo + 2, -128, lo + 3, lo + 4, lo + 5, -128, lo + 6, lo + 7, lo + 8, -128,       \
      lo + 9, lo + 10, lo + 11, -128, hi + 0, hi + 1, hi + 2, -128, hi + 3, hi + 4, hi + 5, -128, \
      hi + 6, hi + 7, hi + 8, -128, hi + 9, hi + 10, hi + 11, -128
      if constexpr (wide) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p - 4));
        return _mm256_shuffle_epi8(v, _mm256_setr_epi8(MQ_LANES3(4, 0)));
      } else {
        const __m256i v = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)),
            1);
        return _mm256_shuffle_epi8(v, _mm256_setr_epi8(MQ_LANES3(0, 4)));
      }
#undef MQ_LANES3
    }
  }
};

#include "moe_swiglu/moe_rows_simd.inc"
// The integer kernels' int32 adds stay in the order written (each register's vpmaddwd
// added as it comes) instead of GCC's balanced tree: 2-6 % faster on AMD Zen 1 (bench/RESULTS.md,
// issue 15 session 6). Reassociation never touches float operations here, so results are
// unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-tree-reassoc")
#endif
#include "moe_swiglu/moe_rows_avx2int.inc"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

} // namespace

RowsFn rows_avx2(int bits, SType s) {
  return pick_simd<V>(bits, s);
}

void round_scaled_avx2(const float* v, int n, double inv, int xmax, int32_t* X) {
  const __m256d vi = _mm256_set1_pd(inv);
  const __m256d hi = _mm256_set1_pd(static_cast<double>(xmax));
  const __m256d lo = _mm256_set1_pd(-static_cast<double>(xmax));
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    // The product is exact-rounded as in the scalar loop; rounding to the nearest
    // integer (ties to even) is what its add-and-remove of 1.5 * 2^52 does.
    __m256d q = _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(v + i)), vi);
    q = _mm256_round_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_pd(_mm256_max_pd(q, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(X + i), _mm256_cvttpd_epi32(q));
  }
  for (; i < n; ++i) {
    const double q = std::nearbyint(static_cast<double>(v[i]) * inv);
    X[i] = static_cast<int32_t>(std::min(std::max(q, -double(xmax)), double(xmax)));
  }
}

RowsFn rows_avx2int(int bits, SType s, int levels) {
  return levels == 2 ? w16_pick<2>(bits, s) : w16_pick<1>(bits, s);
}

} // namespace moequant::cpu
