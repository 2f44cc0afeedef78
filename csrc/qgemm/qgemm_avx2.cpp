// The quantized GEMM's AVX2 + FMA pieces (this file is compiled with those flags and
// only called after a run-time CPU check, see qgemm.cpp).
#include <immintrin.h>

#include <cstring>

#include "qgemm/qgemm_kernels.h"

namespace moequant::qgemm::detail {

namespace {

// Codes 16 at a time from 2B bytes, loaded as one 16-byte vector (a byte-wise copy of
// fewer bytes would go through the stack and stall on store forwarding). Lane i of
// lo/hi = code i/8 + i: a byte shuffle brings bytes B*i/8 and B*i/8 + 1 (every code
// spans at most 2 bytes) to the bottom of lane i, a per-lane shift and a mask finish
// it. The 16 bytes are in both 128-bit halves, since the shuffle stays within a half.
template <int B>
inline void codes16(__m128i bytes, __m256i& lo, __m256i& hi) {
  const __m256i v = _mm256_broadcastsi128_si256(bytes);
  constexpr auto sel = [](int half, int i, int j) {
    return static_cast<char>(half * B + (B * i) / 8 + j);
  };
  const __m256i s0 = _mm256_setr_epi8(
      sel(0, 0, 0),
      sel(0, 0, 1),
      -128,
      -128,
      sel(0, 1, 0),
      sel(0, 1, 1),
      -128,
      -128,
      sel(0, 2, 0),
      sel(0, 2, 1),
      -128,
      -128,
      sel(0, 3, 0),
      sel(0, 3, 1),
      -128,
      -128,
      sel(0, 4, 0),
      sel(0, 4, 1),
      -128,
      -128,
      sel(0, 5, 0),
      sel(0, 5, 1),
      -128,
      -128,
      sel(0, 6, 0),
      sel(0, 6, 1),
      -128,
      -128,
      sel(0, 7, 0),
      sel(0, 7, 1),
      -128,
      -128);
  const __m256i s1 = _mm256_setr_epi8(
      sel(1, 0, 0),
      sel(1, 0, 1),
      -128,
      -128,
      sel(1, 1, 0),
      sel(1, 1, 1),
      -128,
      -128,
      sel(1, 2, 0),
      sel(1, 2, 1),
      -128,
      -128,
      sel(1, 3, 0),
      sel(1, 3, 1),
      -128,
      -128,
      sel(1, 4, 0),
      sel(1, 4, 1),
      -128,
      -128,
      sel(1, 5, 0),
      sel(1, 5, 1),
      -128,
      -128,
      sel(1, 6, 0),
      sel(1, 6, 1),
      -128,
      -128,
      sel(1, 7, 0),
      sel(1, 7, 1),
      -128,
      -128);
  const __m256i shift = _mm256_setr_epi32(
      (B * 0) % 8,
      (B * 1) % 8,
      (B * 2) % 8,
      (B * 3) % 8,
      (B * 4) % 8,
      (B * 5) % 8,
      (B * 6) % 8,
      (B * 7) % 8);
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, s0), shift), mask);
  hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, s1), shift), mask);
}

template <int B>
void decode_avx2(const uint8_t* w, const float* s, const float* b, int kc, int G, float* dst) {
  // Each step reads 16 bytes at w + 2B * step, past the chunk for its last steps; those
  // read the 16 bytes that end at the chunk's end and shift the wanted ones down, so
  // nothing outside the chunk is read. Chunks are at least 12 bytes (32 codes of 3
  // bits), and shorter than 16 only then (a zero-padded copy).
  const int nbytes = kc * B / 8;
  const __m128i iota = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int k = 0; k < kc; k += 16) {
    const int off = k * B / 8;
    __m128i bytes;
    if (off + 16 <= nbytes) {
      bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + off));
    } else if (nbytes >= 16) {
      const __m128i end = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + nbytes - 16));
      // Byte i <- byte i + 16 - (nbytes - off); the 2B wanted ones stay in range.
      bytes = _mm_shuffle_epi8(end, _mm_add_epi8(iota, _mm_set1_epi8(16 - (nbytes - off))));
    } else {
      alignas(16) uint8_t tmp[16] = {};
      std::memcpy(tmp, w + off, 2 * B);
      bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    __m256i lo, hi;
    codes16<B>(bytes, lo, hi);
    const __m256 sg = _mm256_broadcast_ss(s + k / G);
    const __m256 bg = _mm256_broadcast_ss(b + k / G);
    _mm256_storeu_ps(dst + k, _mm256_fmadd_ps(sg, _mm256_cvtepi32_ps(lo), bg));
    _mm256_storeu_ps(dst + k + 8, _mm256_fmadd_ps(sg, _mm256_cvtepi32_ps(hi), bg));
  }
}

// Register-blocked micro-kernel: kNR rows of W (broadcast one weight at a time) times
// R = 8 or 16 rows of x (one or two vectors per k), kNR * R / 8 accumulators. Named
// registers: with arrays GCC stored every accumulator to the stack each iteration.
template <int R>
void kernel_avx2(
    const float* xb,
    const float* wd,
    int64_t ldw,
    int kc,
    float* c,
    int64_t ldc,
    bool accumulate) {
  static_assert(kNR == 6);
  __m256 c00 = _mm256_setzero_ps(), c10 = c00, c20 = c00, c30 = c00, c40 = c00, c50 = c00;
  __m256 c01 = c00, c11 = c00, c21 = c00, c31 = c00, c41 = c00, c51 = c00;
  const float* w0 = wd;
  const float* w1 = wd + ldw;
  const float* w2 = wd + 2 * ldw;
  const float* w3 = wd + 3 * ldw;
  const float* w4 = wd + 4 * ldw;
  const float* w5 = wd + 5 * ldw;
  for (int k = 0; k < kc; ++k) {
    const float* xk = xb + k * kRowBlock;
    const __m256 a0 = _mm256_load_ps(xk);
    __m256 a1;
    if constexpr (R == 16) {
      a1 = _mm256_load_ps(xk + 8);
    }
#define MQ_STEP(j)                                   \
  {                                                  \
    const __m256 wv = _mm256_broadcast_ss(w##j + k); \
    c##j##0 = _mm256_fmadd_ps(a0, wv, c##j##0);      \
    if constexpr (R == 16) {                         \
      c##j##1 = _mm256_fmadd_ps(a1, wv, c##j##1);    \
    }                                                \
  }
    MQ_STEP(0)
    MQ_STEP(1)
    MQ_STEP(2)
    MQ_STEP(3)
    MQ_STEP(4)
    MQ_STEP(5)
#undef MQ_STEP
  }
  auto put = [&](float* p, __m256 v) {
    _mm256_storeu_ps(p, accumulate ? _mm256_add_ps(_mm256_loadu_ps(p), v) : v);
  };
  const __m256 lo[kNR] = {c00, c10, c20, c30, c40, c50};
  const __m256 hi[kNR] = {c01, c11, c21, c31, c41, c51};
  for (int j = 0; j < kNR; ++j) {
    put(c + j * ldc, lo[j]);
    if constexpr (R == 16) {
      put(c + j * ldc + 8, hi[j]);
    }
  }
}

} // namespace

double fma_probe_avx2(long iters) {
  // 12 independent chains (more than FMA latency x throughput on current x86 cores),
  // on values that stay finite: x = x * a + b with a just below 1.
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) {
    acc[i] = _mm256_set1_ps(static_cast<float>(i));
  }
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(0.001f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) {
      acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    }
  }
  __m256 t = acc[0];
  for (int i = 1; i < 12; ++i) {
    t = _mm256_add_ps(t, acc[i]);
  }
  float out[8];
  _mm256_storeu_ps(out, t);
  return out[0]; // keeps the loop alive
}

namespace {
template <int B>
struct DecodeAvx2 {
  static constexpr DecodeFn fn = &decode_avx2<B>;
};
} // namespace

Kernels kernels_avx2(int bits) {
  return {pick_bits<DecodeAvx2>(bits), &kernel_avx2<16>, &kernel_avx2<8>};
}

} // namespace moequant::qgemm::detail
