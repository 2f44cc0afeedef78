// The mse fit's AVX2 path: steps 2-4 of metal/requantize_fit.h on 8 lanes. The
// candidate grid runs 8 candidates per vector (two vectors per pass over the slots),
// Lloyd its starts in one vector, the exact errors 8 slots per vector (lane j = the
// partial sum of slots j mod 8); INT4 nibble counts and codes by byte shuffles. Per lane
// the operations are the header's, so the result equals the scalar path bit for bit.
// Built with -mavx2 -mf16c -mpopcnt and no FMA contraction (CMakeLists.txt).
#include "requantize/fit_cpu.h"

#include <immintrin.h>

#include <array>
#include <cstring>

#include "mlx/types/half_types.h"

namespace moequant::fit {
namespace {

struct M8 {
  __m256 m;
};
struct V8 {
  __m256 v;
  V8() = default;
  V8(float x) : v(_mm256_set1_ps(x)) {}
  explicit V8(__m256 x) : v(x) {}
};
inline V8 operator+(V8 a, V8 b) {
  return V8(_mm256_add_ps(a.v, b.v));
}
inline V8 operator-(V8 a, V8 b) {
  return V8(_mm256_sub_ps(a.v, b.v));
}
inline V8 operator*(V8 a, V8 b) {
  return V8(_mm256_mul_ps(a.v, b.v));
}
inline V8 mq_div(V8 a, V8 b) {
  return V8(_mm256_div_ps(a.v, b.v));
}
inline V8 mq_rint(V8 a) {
  return V8(_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline M8 mq_lt(V8 a, V8 b) {
  return M8{_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)};
}
inline M8 mq_eq(V8 a, V8 b) {
  return M8{_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)};
}
inline M8 mq_and(M8 a, M8 b) {
  return M8{_mm256_and_ps(a.m, b.m)};
}
inline M8 mq_andnot(M8 a, M8 b) {
  return M8{_mm256_andnot_ps(a.m, b.m)};
}
inline V8 mq_sel(M8 m, V8 a, V8 b) {
  return V8(_mm256_blendv_ps(b.v, a.v, m.m));
}
inline bool mq_any(M8 m) {
  return _mm256_movemask_ps(m.m) != 0;
}
// clamp(x, 0, n) of the header in two instructions: max_ps(a, b) is a > b ? a : b and
// min_ps(a, b) is a < b ? a : b, so with these operand orders NaN and -0 come out as
// from `x < 0 ? 0 : x` and `n < x ? n : x`.
inline V8 mq_fit_clamp(V8 x, V8 n) {
  return V8(_mm256_min_ps(n.v, _mm256_max_ps(_mm256_setzero_ps(), x.v)));
}

#include "requantize_fit.h"

// Rounding of 8 lanes to T, as the scalar conversions do it.
template <typename T>
struct rt8;
template <>
struct rt8<float> {
  static V8 round(V8 x) {
    return x;
  }
};
template <>
struct rt8<mlx::core::float16_t> {
  static V8 round(V8 x) {
    return V8(_mm256_cvtph_ps(_mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT)));
  }
};
template <>
struct rt8<mlx::core::bfloat16_t> {
  // Round to nearest even on the bits (finite inputs; NaN never reaches a decision).
  static V8 round(V8 x) {
    __m256i b = _mm256_castps_si256(x.v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb);
    b = _mm256_and_si256(b, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    return V8(_mm256_castsi256_ps(b));
  }
};

template <typename T>
struct fit_avx2 {
  // Candidate k's range start lo = a and 1 / s, as the scalar backend computes them:
  // they depend on the bits only, so they are made once per bit width.
  static constexpr int NV = (MQ_FIT_NCAND + 7) / 8; // vectors of candidates
  struct cand_table {
    alignas(32) float lo[8 * NV];
    alignas(32) float inv[8 * NV];
  };
  static const cand_table& table(float nb) {
    static const auto t = [] {
      std::array<cand_table, 9> r{};
      for (int bits = 1; bits <= 8; ++bits) {
        const float n = static_cast<float>((1 << bits) - 1);
        for (int k = 0; k < 8 * NV; ++k) {
          const int kk = k < MQ_FIT_NCAND ? k : MQ_FIT_NCAND - 1; // padding lanes repeat
          const float a = mq_fit_grid_value(kk / MQ_FIT_GRID);
          const float b = mq_fit_grid_value(kk % MQ_FIT_GRID);
          r[bits].lo[k] = a;
          r[bits].inv[k] = MQ_DIV(1.0f, MQ_DIV((1.0f - a) - b, n));
        }
      }
      return r;
    }();
    return t[__builtin_ctz(static_cast<unsigned>(nb) + 1u)];
  }

  static void candidates(
      const mq_fit_slots& g,
      float S0,
      float T1,
      float T2,
      float nb,
      float* sig,
      float* beta,
      float* err,
      float* S1,
      float* S2,
      float* S3) {
    const cand_table& ct = table(nb);
    alignas(32) float o[6][8 * NV];
    const V8 vnb(nb);
    // Per lane the operations of mq_fit_stats and mq_fit_solve; two candidate vectors
    // per pass over the slots share the slot broadcasts.
    auto finish = [&](int v, const V8& p1, const V8& p2, const V8& p3) {
      V8 sg, be, er;
      M8 ok;
      mq_fit_solve(V8(S0), V8(T1), V8(T2), p1, p2, p3, sg, be, er, ok);
      const V8* r[6] = {&sg, &be, &er, &p1, &p2, &p3};
      for (int f = 0; f < 6; ++f) {
        _mm256_store_ps(o[f] + 8 * v, r[f]->v);
      }
    };
    int v = 0;
    for (; v + 2 <= NV; v += 2) {
      const V8 a0(_mm256_load_ps(ct.lo + 8 * v)), a1(_mm256_load_ps(ct.lo + 8 * v + 8));
      const V8 inv0(_mm256_load_ps(ct.inv + 8 * v)), inv1(_mm256_load_ps(ct.inv + 8 * v + 8));
      V8 p1(0.0f), p2(0.0f), p3(0.0f), r1(0.0f), r2(0.0f), r3(0.0f);
      for (int j = 0; j < g.m; ++j) {
        const V8 t(g.t[j]), c(g.cc[j]), cu(g.ct[j]);
        const V8 q0 = mq_fit_clamp(mq_rint((t - a0) * inv0), vnb);
        const V8 q1 = mq_fit_clamp(mq_rint((t - a1) * inv1), vnb);
        const V8 cq0 = c * q0, cq1 = c * q1;
        p1 = p1 + cq0;
        r1 = r1 + cq1;
        p2 = p2 + cq0 * q0;
        r2 = r2 + cq1 * q1;
        p3 = p3 + cu * q0;
        r3 = r3 + cu * q1;
      }
      finish(v, p1, p2, p3);
      finish(v + 1, r1, r2, r3);
    }
    if (v < NV) {
      const V8 a0(_mm256_load_ps(ct.lo + 8 * v)), inv0(_mm256_load_ps(ct.inv + 8 * v));
      V8 p1(0.0f), p2(0.0f), p3(0.0f);
      for (int j = 0; j < g.m; ++j) {
        const V8 t(g.t[j]), c(g.cc[j]), cu(g.ct[j]);
        const V8 q0 = mq_fit_clamp(mq_rint((t - a0) * inv0), vnb);
        const V8 cq0 = c * q0;
        p1 = p1 + cq0;
        p2 = p2 + cq0 * q0;
        p3 = p3 + cu * q0;
      }
      finish(v, p1, p2, p3);
    }
    float* dst[6] = {sig, beta, err, S1, S2, S3};
    for (int f = 0; f < 6; ++f) {
      std::memcpy(dst[f], o[f], sizeof(float) * MQ_FIT_NCAND);
    }
  }

  static void lloyd(
      const mq_fit_slots& g,
      float S0,
      float T1,
      float T2,
      float nb,
      const float* sig,
      const float* beta,
      const float* err,
      const float* S1,
      const float* S2,
      const float* S3,
      float* best_e,
      float* best_s,
      float* best_b) {
    static_assert(MQ_FIT_STARTS <= 8, "the starts share one vector");
    alignas(32) float l[9][8];
    const float* src[6] = {sig, beta, err, S1, S2, S3};
    for (int f = 0; f < 6; ++f) {
      for (int i = 0; i < 8; ++i) {
        l[f][i] = src[f][i < MQ_FIT_STARTS ? i : 0];
      }
    }
    alignas(32) float act[8];
    for (int i = 0; i < 8; ++i) {
      act[i] = (i < MQ_FIT_STARTS && err[i] < MQ_INF) ? 1.0f : 0.0f;
    }
    V8 be(_mm256_load_ps(l[2])), bs(_mm256_load_ps(l[0])), bb(_mm256_load_ps(l[1]));
    M8 active = mq_lt(V8(0.0f), V8(_mm256_load_ps(act)));
    mq_fit_lloyd(
        g.t,
        g.cc,
        g.ct,
        g.m,
        V8(S0),
        V8(T1),
        V8(T2),
        V8(nb),
        V8(_mm256_load_ps(l[0])),
        V8(_mm256_load_ps(l[1])),
        V8(_mm256_load_ps(l[3])),
        V8(_mm256_load_ps(l[4])),
        V8(_mm256_load_ps(l[5])),
        active,
        be,
        bs,
        bb);
    _mm256_store_ps(l[6], be.v);
    _mm256_store_ps(l[7], bs.v);
    _mm256_store_ps(l[8], bb.v);
    for (int r = 0; r < MQ_FIT_STARTS; ++r) {
      best_e[r] = l[6][r];
      best_s[r] = l[7][r];
      best_b[r] = l[8][r];
    }
  }

  static float
  error(const mq_fit_slots& g, float s, float b, float inv, float nb, bool mm, float ms, float mb) {
    const V8 vs(s), vb(b), vinv(inv), vnb(nb), vms(ms), vmb(mb);
    V8 acc(0.0f);
    for (int j = 0; j < g.n; j += 8) {
      const V8 v(_mm256_loadu_ps(g.v + j)), c(_mm256_loadu_ps(g.c + j));
      const V8 q = mm ? mq_fit_clamp(mq_rint(mq_div(v - vmb, vms)), vnb)
                      : mq_fit_clamp(mq_rint((v - vb) * vinv), vnb);
      acc = acc + mq_fit_term<V8, rt8<T>>(v, c, q, vs, vb);
    }
    alignas(32) float a[8];
    _mm256_store_ps(a, acc.v);
    return mq_fit_tree8(a);
  }
};

#include "requantize/fit_rows.h"

// mq_rows_scalar on vectors: nibble counts by byte compares, codes by a 16-entry table.
struct rows_avx2 {
  static void counts(const uint8_t* in, int* cnt) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m256i nib =
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), m), _mm_and_si128(x, m));
    for (int u = 0; u < 16; ++u) {
      const __m256i eq = _mm256_cmpeq_epi8(nib, _mm256_set1_epi8(static_cast<char>(u)));
      cnt[u] = _mm_popcnt_u32(static_cast<unsigned>(_mm256_movemask_epi8(eq)));
    }
  }
  static void
  codes(const mq_fit_result& r, const float* v, float nb, const uint8_t* in, uint8_t* out) {
    // mq_fit_code per lane: the same float ops, NaN -> 0.
    const V8 vnb(nb);
    __m256i qi[2];
    for (int h = 0; h < 2; ++h) {
      const V8 x(_mm256_loadu_ps(v + 8 * h));
      const V8 q = r.fit ? mq_fit_clamp(mq_rint((x - V8(r.bias)) * V8(r.inv)), vnb)
                         : mq_fit_clamp(mq_rint(mq_div(x - V8(r.mm.bias), V8(r.mm.scale))), vnb);
      qi[h] = _mm256_cvttps_epi32(_mm256_and_ps(q.v, _mm256_cmp_ps(q.v, q.v, _CMP_ORD_Q)));
    }
    // 16 int32 in [0, 255] -> 16 bytes in order.
    __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(qi[0], qi[1]), 0xD8);
    const __m128i lut = _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(x, m));
    const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(x, 4), m));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_unpackhi_epi8(lo, hi));
  }
};

} // namespace

void fit_groups_avx2(const FitArgs& a, bool int4, std::size_t g0, std::size_t g1) {
  fit_groups_dispatch<fit_avx2, rows_avx2>(a, int4, g0, g1);
}

} // namespace moequant::fit
