// dense_linear's AVX2 tile (compiled with -mavx2 -mf16c and no FMA: each product is
// rounded to float32 before its add, as MLX's CPU matmul does). Lane i of a vector
// holds row n0 + 8 g + i; its accumulator adds the products in k order, so every output
// is the same sequential sum as the scalar tile.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "dense_gemm/dense_linear.h"

namespace moequant::dense_rows {

namespace {

// 8 rows x 8 k of the weight as 8 vectors: out[j] lane i = row i, column k + j.
[[gnu::always_inline]] inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// bf16 rows: rows i and i + 4 in the two 128-bit lanes, a 4 x 4 transpose of 32-bit
// words (two bf16 each) within the lanes: u[j] lane i = the bf16 pair (k + 2j, k + 2j + 1)
// of row i. bf16_lo / bf16_hi shift / mask one of the pair into float32: no cross-lane
// shuffle.
[[gnu::always_inline]] inline void bf16_words(const void* const* rows, int64_t k, __m256i u[4]) {
  __m256i v[4];
  for (int i = 0; i < 4; ++i) {
    const auto* a = static_cast<const uint16_t*>(rows[i]) + k;
    const auto* b = static_cast<const uint16_t*>(rows[i + 4]) + k;
    v[i] = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)),
        1);
  }
  const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
  u[0] = _mm256_unpacklo_epi64(t0, t2);
  u[1] = _mm256_unpackhi_epi64(t0, t2);
  u[2] = _mm256_unpacklo_epi64(t1, t3);
  u[3] = _mm256_unpackhi_epi64(t1, t3);
}

[[gnu::always_inline]] inline __m256 bf16_lo(__m256i u) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

[[gnu::always_inline]] inline __m256 bf16_hi(__m256i u) {
  return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

template <WType W>
[[gnu::always_inline]] inline void load8x8(const void* const* rows, int64_t k, __m256 out[8]) {
  if constexpr (W == WType::bf16) {
    __m256i u[4];
    bf16_words(rows, k, u);
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = bf16_lo(u[j]);
      out[2 * j + 1] = bf16_hi(u[j]);
    }
  } else {
    for (int i = 0; i < 8; ++i) {
      if constexpr (W == WType::f16) {
        const auto* a = static_cast<const uint16_t*>(rows[i]) + k;
        out[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
      } else {
        out[i] = _mm256_loadu_ps(static_cast<const float*>(rows[i]) + k);
      }
    }
    transpose8(out);
  }
}

// How far ahead (in columns) each row's lines are prefetched.
constexpr int kPrefetchK = 256;

int elem_size(WType w) {
  return w == WType::f32 ? 4 : 2;
}

template <WType W, int G>
void tile(const Tile& t) {
  constexpr int R = 8 * G;
  const int es = elem_size(W);
  // Row pointers; rows past n1 repeat the last row (their lanes are dropped).
  const void* rows[R];
  for (int i = 0; i < R; ++i) {
    const int64_t n = std::min(t.n0 + i, t.n1 - 1);
    rows[i] = static_cast<const char*>(t.w) + n * t.ldw * es;
  }
  // The panel of kPanelK columns of the tile's rows, k-major: panel[k][g] is a vector of
  // 8 rows. Built once per panel, used by every row of x.
  alignas(32) float panel[kPanelK * R];
  // K's last partial group of 8 columns: the rows' tails copied to zero-padded buffers
  // (the padded columns are never multiplied: the loops stop at K).
  alignas(16) char tail[R][8 * 4];
  const int64_t kfull = t.K / 8 * 8;
  const void* tail_rows[R];
  if (kfull < t.K) {
    for (int i = 0; i < R; ++i) {
      std::memset(tail[i], 0, sizeof(tail[i]));
      std::memcpy(tail[i], static_cast<const char*>(rows[i]) + kfull * es, (t.K - kfull) * es);
      tail_rows[i] = tail[i];
    }
  }
  const int nr = static_cast<int>(t.n1 - t.n0);
  if (t.M == 1) {
    // One row of x (a decode step): the transposed columns go straight into the
    // products, no panel (Zen 1 stores one 128-bit half per cycle).
    __m256 acc[G];
    for (int g = 0; g < G; ++g) {
      acc[g] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < t.K; k += 8) {
      if ((k * es) % 64 == 0 && k + kPrefetchK < t.K) {
        for (int i = 0; i < R; ++i) {
          _mm_prefetch(static_cast<const char*>(rows[i]) + (k + kPrefetchK) * es, _MM_HINT_T0);
        }
      }
      const int kn = static_cast<int>(std::min<int64_t>(8, t.K - k));
      int g = 0;
      if constexpr (W == WType::bf16) {
        // Two groups at a time, their adds interleaved: each lane's adds form one
        // dependent chain (3-4 cycles each), so two chains per step keep the adders busy.
        for (; g + 1 < G && k < kfull; g += 2) {
          __m256i ua[4], ub[4];
          bf16_words(rows + 8 * g, k, ua);
          bf16_words(rows + 8 * g + 8, k, ub);
          for (int j = 0; j < 4; ++j) {
            // x broadcast from memory at each use: no registers held across the step.
            const __m256 x0 = _mm256_broadcast_ss(t.x + k + 2 * j);
            const __m256 x1 = _mm256_broadcast_ss(t.x + k + 2 * j + 1);
            acc[g] = _mm256_add_ps(acc[g], _mm256_mul_ps(bf16_lo(ua[j]), x0));
            acc[g + 1] = _mm256_add_ps(acc[g + 1], _mm256_mul_ps(bf16_lo(ub[j]), x0));
            acc[g] = _mm256_add_ps(acc[g], _mm256_mul_ps(bf16_hi(ua[j]), x1));
            acc[g + 1] = _mm256_add_ps(acc[g + 1], _mm256_mul_ps(bf16_hi(ub[j]), x1));
          }
        }
      }
      for (; g < G; ++g) {
        __m256 v[8], xb[8];
        for (int j = 0; j < kn; ++j) {
          xb[j] = _mm256_broadcast_ss(t.x + k + j);
        }
        if (k < kfull) {
          load8x8<W>(rows + 8 * g, k, v);
          for (int j = 0; j < 8; ++j) {
            acc[g] = _mm256_add_ps(acc[g], _mm256_mul_ps(v[j], xb[j]));
          }
        } else {
          load8x8<W>(tail_rows + 8 * g, 0, v);
          for (int j = 0; j < kn; ++j) {
            acc[g] = _mm256_add_ps(acc[g], _mm256_mul_ps(v[j], xb[j]));
          }
        }
      }
    }
    alignas(32) float acc_mem[R];
    for (int g = 0; g < G; ++g) {
      _mm256_store_ps(acc_mem + 8 * g, acc[g]);
    }
    std::memcpy(t.y, acc_mem, sizeof(float) * nr);
    return;
  }
  for (int64_t k0 = 0; k0 < t.K; k0 += kPanelK) {
    const int kc = static_cast<int>(std::min<int64_t>(kPanelK, t.K - k0));
    for (int kk = 0; kk < kc; kk += 8) {
      // The tile reads R rows at once, more streams than the hardware prefetchers
      // follow: each row's line one panel ahead is requested here.
      if ((kk * es) % 64 == 0 && k0 + kPrefetchK + kk < t.K) {
        for (int i = 0; i < R; ++i) {
          _mm_prefetch(
              static_cast<const char*>(rows[i]) + (k0 + kPrefetchK + kk) * es, _MM_HINT_T0);
        }
      }
      for (int g = 0; g < G; ++g) {
        __m256 v[8];
        if (k0 + kk < kfull) {
          load8x8<W>(rows + 8 * g, k0 + kk, v);
        } else {
          load8x8<W>(tail_rows + 8 * g, 0, v);
        }
        for (int j = 0; j < 8; ++j) {
          _mm256_store_ps(panel + ((kk + j) * G + g) * 8, v[j]);
        }
      }
    }
    for (int64_t m = 0; m < t.M; ++m) {
      float* y = t.y + m * t.ldy;
      alignas(32) float acc_mem[R];
      __m256 acc[G];
      if (k0 == 0) {
        for (int g = 0; g < G; ++g) {
          acc[g] = _mm256_setzero_ps();
        }
      } else {
        std::memcpy(acc_mem, y, sizeof(float) * nr);
        for (int g = 0; g < G; ++g) {
          acc[g] = _mm256_load_ps(acc_mem + 8 * g);
        }
      }
      const float* xm = t.x + m * t.K + k0;
      for (int k = 0; k < kc; ++k) {
        const __m256 xb = _mm256_broadcast_ss(xm + k);
        for (int g = 0; g < G; ++g) {
          acc[g] =
              _mm256_add_ps(acc[g], _mm256_mul_ps(_mm256_load_ps(panel + (k * G + g) * 8), xb));
        }
      }
      for (int g = 0; g < G; ++g) {
        _mm256_store_ps(acc_mem + 8 * g, acc[g]);
      }
      std::memcpy(y, acc_mem, sizeof(float) * nr);
    }
  }
}

template <WType W>
void tile_w(const Tile& t) {
  switch ((t.n1 - t.n0 + 7) / 8) {
    case 1:
      return tile<W, 1>(t);
    case 2:
      return tile<W, 2>(t);
    case 3:
      return tile<W, 3>(t);
    default:
      return tile<W, 4>(t);
  }
}

} // namespace

void tile_avx2(const Tile& t) {
  static_assert(kTileRows == 32 && kPanelK % 8 == 0);
  with_wtype(t.wt, [&](auto w) { tile_w<decltype(w)::value>(t); });
}

} // namespace moequant::dense_rows
