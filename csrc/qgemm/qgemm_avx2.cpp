// The quantized GEMM's AVX2 + FMA pieces (this file is compiled with those flags and
// only called after a run-time CPU check, see qgemm.cpp).
#include <immintrin.h>

#include <cstring>

#include "qgemm/qgemm_kernels.h"

namespace moequant::qgemm::detail {

namespace {

// Lane i of the result = code i of the 8 codes held in B bytes at p. Every code spans
// at most 2 bytes (B <= 8): a byte shuffle brings bytes B*i/8 and B*i/8 + 1 to the
// bottom of lane i, a per-lane shift and a mask finish it. The 8 bytes are broadcast to
// both 128-bit halves, since the shuffle stays within a half.
template <int B>
inline __m256i codes8(const uint8_t* p) {
  uint64_t v = 0;
  std::memcpy(&v, p, B); // exactly B bytes: never past the end of the matrix
  const __m256i vv = _mm256_set1_epi64x(static_cast<long long>(v));
  if constexpr (B == 8) {
    return _mm256_cvtepu8_epi32(_mm256_castsi256_si128(vv));
  } else {
    constexpr auto byte = [](int i, int j) { return static_cast<char>((B * i) / 8 + j); };
    const __m256i shuf = _mm256_setr_epi8(
        byte(0, 0), byte(0, 1), -128, -128, byte(1, 0), byte(1, 1), -128, -128,
        byte(2, 0), byte(2, 1), -128, -128, byte(3, 0), byte(3, 1), -128, -128,
        byte(4, 0), byte(4, 1), -128, -128, byte(5, 0), byte(5, 1), -128, -128,
        byte(6, 0), byte(6, 1), -128, -128, byte(7, 0), byte(7, 1), -128, -128);
    const __m256i shift = _mm256_setr_epi32(
        (B * 0) % 8, (B * 1) % 8, (B * 2) % 8, (B * 3) % 8, (B * 4) % 8, (B * 5) % 8,
        (B * 6) % 8, (B * 7) % 8);
    const __m256i q = _mm256_srlv_epi32(_mm256_shuffle_epi8(vv, shuf), shift);
    return _mm256_and_si256(q, _mm256_set1_epi32((1 << B) - 1));
  }
}

template <int B>
void decode_avx2(const uint8_t* w, const float* s, const float* b, int kc, int G, float* dst) {
  for (int g = 0; g < kc / G; ++g) {
    const __m256 sg = _mm256_broadcast_ss(s + g);
    const __m256 bg = _mm256_broadcast_ss(b + g);
    const uint8_t* wg = w + static_cast<std::size_t>(g) * G * B / 8;
    float* dg = dst + g * G;
    for (int k = 0; k < G; k += 8) {
      const __m256 q = _mm256_cvtepi32_ps(codes8<B>(wg + (k / 8) * B));
      _mm256_storeu_ps(dg + k, _mm256_fmadd_ps(sg, q, bg));
    }
  }
}

// Register-blocked micro-kernel: kNR rows of W (broadcast one weight at a time) times
// R = 8 or 16 rows of x (one or two vectors per k), kNR * R / 8 accumulators.
template <int R>
void kernel_avx2(const float* xb, const float* wd, int64_t ldw, int kc, float* c, int64_t ldc,
                 bool accumulate) {
  constexpr int V = R / 8;
  __m256 acc[kNR][V];
  for (int j = 0; j < kNR; ++j) {
    for (int v = 0; v < V; ++v) {
      acc[j][v] = _mm256_setzero_ps();
    }
  }
  const float* wj[kNR];
  for (int j = 0; j < kNR; ++j) {
    wj[j] = wd + j * ldw;
  }
  for (int k = 0; k < kc; ++k) {
    __m256 a[V];
    for (int v = 0; v < V; ++v) {
      a[v] = _mm256_load_ps(xb + k * kRowBlock + 8 * v);
    }
#pragma GCC unroll 6
    for (int j = 0; j < kNR; ++j) {
      const __m256 wv = _mm256_broadcast_ss(wj[j] + k);
      for (int v = 0; v < V; ++v) {
        acc[j][v] = _mm256_fmadd_ps(a[v], wv, acc[j][v]);
      }
    }
  }
  for (int j = 0; j < kNR; ++j) {
    for (int v = 0; v < V; ++v) {
      float* p = c + j * ldc + 8 * v;
      _mm256_storeu_ps(p, accumulate ? _mm256_add_ps(_mm256_loadu_ps(p), acc[j][v]) : acc[j][v]);
    }
  }
}

} // namespace

Kernels kernels_avx2(int bits) {
  DecodeFn d = nullptr;
  switch (bits) {
    case 2:
      d = &decode_avx2<2>;
      break;
    case 3:
      d = &decode_avx2<3>;
      break;
    case 4:
      d = &decode_avx2<4>;
      break;
    case 5:
      d = &decode_avx2<5>;
      break;
    case 6:
      d = &decode_avx2<6>;
      break;
    case 8:
      d = &decode_avx2<8>;
      break;
    default:
      return {nullptr, nullptr, nullptr};
  }
  return {d, &kernel_avx2<16>, &kernel_avx2<8>};
}

} // namespace moequant::qgemm::detail
