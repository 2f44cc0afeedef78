// The mse fit's AVX2 path: steps 1-4 of metal/requantize_fit.h on vectors. min/max
// per lane (+-0 results: the sequential loop) and the weighted slots left-packed by a
// shuffle table; the t statistics over those; the candidate grid 8 candidates per V8
// (both in one pass over the slots); the starts by a vector argmin instead of a branchy
// insertion; Lloyd's 4 starts in one V4 (256-bit operations cost two uops on Zen 1);
// the exact errors over the weighted slots 8 at a time (the i-th in lane i % 8: the
// header's partial sums; the padded tail lanes masked to +0), the 4 (scale, bias)
// pairs two passes at a time, up to 4 bits with the reconstructed value of each code from a
// per-neighbour table; INT4 nibble counts and codes by byte shuffles. Per lane the operations are
// the header's, so the result equals the scalar path bit for bit (tests/test_requantize_fit.py).
// Built with -mavx2 -mf16c -mpopcnt and no FMA contraction (CMakeLists.txt).
#include "requantize/fit_cpu.h"

#include <immintrin.h>

#include <array>
#include <cstring>
#include <type_traits>

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

// The same operations on 4 lanes (Lloyd's starts; the candidates' last 4): one uop
// each on cores that split 256-bit operations in two.
struct M4 {
  __m128 m;
};
struct V4 {
  __m128 v;
  V4() = default;
  V4(float x) : v(_mm_set1_ps(x)) {}
  explicit V4(__m128 x) : v(x) {}
};
inline V4 operator+(V4 a, V4 b) {
  return V4(_mm_add_ps(a.v, b.v));
}
inline V4 operator-(V4 a, V4 b) {
  return V4(_mm_sub_ps(a.v, b.v));
}
inline V4 operator*(V4 a, V4 b) {
  return V4(_mm_mul_ps(a.v, b.v));
}
inline V4 mq_div(V4 a, V4 b) {
  return V4(_mm_div_ps(a.v, b.v));
}
inline V4 mq_rint(V4 a) {
  return V4(_mm_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline M4 mq_lt(V4 a, V4 b) {
  return M4{_mm_cmplt_ps(a.v, b.v)};
}
inline M4 mq_eq(V4 a, V4 b) {
  return M4{_mm_cmpeq_ps(a.v, b.v)};
}
inline M4 mq_and(M4 a, M4 b) {
  return M4{_mm_and_ps(a.m, b.m)};
}
inline M4 mq_andnot(M4 a, M4 b) {
  return M4{_mm_andnot_ps(a.m, b.m)};
}
inline V4 mq_sel(M4 m, V4 a, V4 b) {
  return V4(_mm_blendv_ps(b.v, a.v, m.m));
}
inline bool mq_any(M4 m) {
  return _mm_movemask_ps(m.m) != 0;
}
inline V4 mq_fit_clamp(V4 x, V4 n) {
  return V4(_mm_min_ps(n.v, _mm_max_ps(_mm_setzero_ps(), x.v)));
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
  using scalar = mq_fit_scalar<T>;
  static constexpr int NV = MQ_FIT_NCAND / 8; // full vectors of candidates
  static constexpr int NT = MQ_FIT_NCAND % 8; // and a tail of 4 (one V4) or none
  static_assert(NT == 0 || NT == 4, "the candidates' tail is one V4");
  static constexpr int NL = 8 * NV + NT;

  // Step 1: per lane j % 8 MLX's loop (min_ps / max_ps with the new value first are
  // `x < m ? x : m` and `m < x ? x : m`; absent slots are NaN, never taken), then the
  // lanes. A minimum or maximum is one value whatever the order except for +-0, so
  // a zero result takes the sequential loop (the first of +0 / -0 wins there).
  // Left-packing indices: entry mask lists the set bits of mask (8-bit), then zeros.
  static const uint64_t* pack_table() {
    static const auto t = [] {
      std::array<uint64_t, 256> r{};
      for (int mask = 0; mask < 256; ++mask) {
        uint64_t x = 0;
        int k = 0;
        for (int i = 0; i < 8; ++i) {
          if (mask & (1 << i)) {
            x |= static_cast<uint64_t>(i) << (8 * k++);
          }
        }
        r[mask] = x;
      }
      return r;
    }();
    return t.data();
  }

  static void minmax(mq_fit_slots& g, const bool* present, float& wmin, float& wmax, bool& finite) {
    const __m256 nan = _mm256_set1_ps(__builtin_nanf(""));
    __m256 mn = _mm256_set1_ps(MQ_INF), mx = _mm256_set1_ps(-MQ_INF);
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    const uint64_t* pt = pack_table();
    int m = 0;
    for (int j = 0; j < g.n; j += 8) {
      long long pb;
      std::memcpy(&pb, present + j, 8);
      const __m256 pm = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(pb)), _mm256_setzero_si256()));
      const __m256 v = _mm256_loadu_ps(g.v + j), c = _mm256_loadu_ps(g.c + j);
      const __m256 x = _mm256_blendv_ps(nan, v, pm);
      mn = _mm256_min_ps(x, mn);
      mx = _mm256_max_ps(x, mx);
      const __m256 z = _mm256_setzero_ps();
      const __m256 fv = _mm256_or_ps(
          _mm256_cmp_ps(_mm256_sub_ps(v, v), z, _CMP_EQ_OQ),
          _mm256_andnot_ps(pm, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
      ok = _mm256_and_ps(ok, _mm256_and_ps(fv, _mm256_cmp_ps(_mm256_sub_ps(c, c), z, _CMP_EQ_OQ)));
      // The weighted slots (c > 0, NaN not) to g.w / g.cc at m, in order.
      const int wm = _mm256_movemask_ps(_mm256_cmp_ps(c, z, _CMP_GT_OQ));
      const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(pt[wm])));
      _mm256_storeu_ps(g.w + m, _mm256_permutevar8x32_ps(v, perm));
      _mm256_storeu_ps(g.cc + m, _mm256_permutevar8x32_ps(c, perm));
      m += _mm_popcnt_u32(static_cast<unsigned>(wm));
    }
    g.m = m;
    __m128 a = _mm_min_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps(mn, 1));
    a = _mm_min_ps(a, _mm_movehl_ps(a, a));
    a = _mm_min_ss(a, _mm_shuffle_ps(a, a, 1));
    __m128 b = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    b = _mm_max_ps(b, _mm_movehl_ps(b, b));
    b = _mm_max_ss(b, _mm_shuffle_ps(b, b, 1));
    wmin = _mm_cvtss_f32(a);
    wmax = _mm_cvtss_f32(b);
    finite = _mm256_movemask_ps(ok) == 0xFF;
    if (wmin == 0.0f || wmax == 0.0f) {
      scalar::minmax(g, present, wmin, wmax, finite);
    }
  }

  // Mask of the lanes j..j+7 below m (the padded tail of the weighted slots).
  static __m256 tail_mask(int j, int m) {
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(m - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }

  // t, c t, (c t) t of the weighted slots on vectors (the padded tail lanes are
  // computed and never read), then the sequential sums.
  static void tstats(mq_fit_slots& g, float wmin, float invR, float& S0, float& T1, float& T2) {
    alignas(32) float c2[MQ_FIT_MAX_SLOTS + 8];
    const V8 vmin(wmin), vinv(invR);
    for (int j = 0; j < g.m; j += 8) {
      const V8 t = (V8(_mm256_loadu_ps(g.w + j)) - vmin) * vinv;
      const V8 ct = V8(_mm256_loadu_ps(g.cc + j)) * t;
      _mm256_storeu_ps(g.t + j, t.v);
      _mm256_storeu_ps(g.ct + j, ct.v);
      _mm256_store_ps(c2 + j, (ct * t).v);
    }
    float s0 = 0.0f, t1 = 0.0f, t2 = 0.0f;
    for (int j = 0; j < g.m; ++j) {
      s0 = s0 + g.cc[j];
      t1 = t1 + g.ct[j];
      t2 = t2 + c2[j];
    }
    S0 = s0;
    T1 = t1;
    T2 = t2;
  }

  // Candidate k's range start lo = a and 1 / s, as the scalar backend computes them:
  // they depend on the bits only, so they are made once per bit width.
  struct cand_table {
    alignas(32) float lo[8 * NV + 8];
    alignas(32) float inv[8 * NV + 8];
  };
  static const cand_table& table(float nb) {
    static const auto t = [] {
      std::array<cand_table, 9> r{};
      for (int bits = 1; bits <= 8; ++bits) {
        const float n = static_cast<float>((1 << bits) - 1);
        const int first = mq_fit_grid_first(n);
        for (int k = 0; k < NL; ++k) {
          const float a = mq_fit_grid_value(first + k / MQ_FIT_GRID);
          const float b = mq_fit_grid_value(first + k % MQ_FIT_GRID);
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
    float* dst[6] = {sig, beta, err, S1, S2, S3};
    // Per lane the operations of mq_fit_stats and mq_fit_solve; two or three
    // candidate vectors per pass over the slots share the slot broadcasts.
    auto finish = [&](int k0, auto p1, auto p2, auto p3) {
      using F = decltype(p1);
      F sg, be, er;
      decltype(mq_lt(p1, p1)) ok;
      mq_fit_solve(F(S0), F(T1), F(T2), p1, p2, p3, sg, be, er, ok);
      const F* r[6] = {&sg, &be, &er, &p1, &p2, &p3};
      for (int f = 0; f < 6; ++f) {
        if constexpr (sizeof(F) == 32) {
          _mm256_storeu_ps(dst[f] + k0, r[f]->v);
        } else {
          _mm_storeu_ps(dst[f] + k0, r[f]->v);
        }
      }
    };
    // Passes of P vectors (the V4 tail with the last one) share the slot broadcasts;
    // 1, 2 or 3 vectors per pass measured the same (throughput-bound).
    auto pass = [&](auto P, auto V0, auto TAIL) {
      constexpr int np = decltype(P)::value;
      constexpr int v0 = decltype(V0)::value;
      constexpr bool tail = decltype(TAIL)::value;
      V8 a[np], inv[np], p1[np], p2[np], p3[np];
      for (int i = 0; i < np; ++i) {
        a[i] = V8(_mm256_load_ps(ct.lo + 8 * (v0 + i)));
        inv[i] = V8(_mm256_load_ps(ct.inv + 8 * (v0 + i)));
        p1[i] = p2[i] = p3[i] = V8(0.0f);
      }
      const V8 vnb(nb);
      const V4 a4(_mm_load_ps(ct.lo + 8 * NV)), inv4(_mm_load_ps(ct.inv + 8 * NV)), wnb(nb);
      V4 u1(0.0f), u2(0.0f), u3(0.0f);
      for (int j = 0; j < g.m; ++j) {
        const V8 t(g.t[j]), c(g.cc[j]), cu(g.ct[j]);
        for (int i = 0; i < np; ++i) {
          const V8 q = mq_fit_clamp(mq_rint((t - a[i]) * inv[i]), vnb);
          const V8 cq = c * q;
          p1[i] = p1[i] + cq;
          p2[i] = p2[i] + cq * q;
          p3[i] = p3[i] + cu * q;
        }
        if constexpr (tail) {
          const V4 t4(_mm256_castps256_ps128(t.v)), c4(_mm256_castps256_ps128(c.v));
          const V4 cu4(_mm256_castps256_ps128(cu.v));
          const V4 q = mq_fit_clamp(mq_rint((t4 - a4) * inv4), wnb);
          const V4 cq = c4 * q;
          u1 = u1 + cq;
          u2 = u2 + cq * q;
          u3 = u3 + cu4 * q;
        }
      }
      for (int i = 0; i < np; ++i) {
        finish(8 * (v0 + i), p1[i], p2[i], p3[i]);
      }
      if constexpr (tail) {
        finish(8 * NV, u1, u2, u3);
      }
    };
    static_assert(NV == 2 && NT == 0, "the pass below covers 2 vectors");
    using std::integral_constant;
    pass(integral_constant<int, 2>{}, integral_constant<int, 0>{}, std::false_type{});
  }

  // The best MQ_FIT_STARTS by repeated argmin: the smallest error (NaN as +inf), its
  // first index (ties: the earlier candidate, as the scalar insertion), then that lane
  // to +inf. Equal to mq_fit_scalar::select, without its unpredictable branches.
  static void select(const float* err, int* bi) {
    constexpr int NVS = (MQ_FIT_NCAND + 7) / 8;
    const __m256 inf = _mm256_set1_ps(MQ_INF);
    __m256 e[NVS];
    __m256i idx[NVS];
    // Loads as wide as candidates() stored them (no store-forwarding stall).
    for (int v = 0; v < NVS; ++v) {
      const __m256 x = 8 * v + 8 <= MQ_FIT_NCAND
          ? _mm256_loadu_ps(err + 8 * v)
          : _mm256_set_m128(_mm_set1_ps(MQ_INF), _mm_loadu_ps(err + 8 * v));
      e[v] = _mm256_min_ps(x, inf); // NaN -> +inf
      idx[v] =
          _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * v));
    }
    for (int r = 0; r < MQ_FIT_STARTS; ++r) {
      __m256 mv = e[0];
      for (int v = 1; v < NVS; ++v) {
        mv = _mm256_min_ps(mv, e[v]);
      }
      __m128 h = _mm_min_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
      h = _mm_min_ps(h, _mm_movehl_ps(h, h));
      h = _mm_min_ss(h, _mm_shuffle_ps(h, h, 1));
      if (!(_mm_cvtss_f32(h) < MQ_INF)) {
        for (; r < MQ_FIT_STARTS; ++r) {
          bi[r] = -1;
        }
        return;
      }
      const __m256 b = _mm256_broadcastss_ps(h);
      unsigned long long mask = 0;
      for (int v = 0; v < NVS; ++v) {
        mask |=
            static_cast<unsigned long long>(_mm256_movemask_ps(_mm256_cmp_ps(e[v], b, _CMP_EQ_OQ)))
            << (8 * v);
      }
      const int k = __builtin_ctzll(mask);
      bi[r] = k;
      const __m256i kk = _mm256_set1_epi32(k);
      for (int v = 0; v < NVS; ++v) {
        e[v] = _mm256_blendv_ps(e[v], inf, _mm256_castsi256_ps(_mm256_cmpeq_epi32(idx[v], kk)));
      }
    }
  }

  // Lloyd's 4 starts in one V4.
  static void lloyd(
      const mq_fit_slots& g,
      float S0,
      float T1,
      float T2,
      float nb,
      const int* bi,
      const float* sig,
      const float* beta,
      const float* err,
      const float* S1,
      const float* S2,
      const float* S3,
      float* best_e,
      float* best_s,
      float* best_b) {
    static_assert(MQ_FIT_STARTS == 4, "the starts fill one V4");
    int k[4];
    for (int r = 0; r < 4; ++r) {
      k[r] = bi[r] < 0 ? 0 : bi[r];
    }
    auto pick = [&](const float* x) { return V4(_mm_setr_ps(x[k[0]], x[k[1]], x[k[2]], x[k[3]])); };
    V4 be(_mm_setr_ps(
        bi[0] < 0 ? MQ_INF : err[k[0]],
        bi[1] < 0 ? MQ_INF : err[k[1]],
        bi[2] < 0 ? MQ_INF : err[k[2]],
        bi[3] < 0 ? MQ_INF : err[k[3]]));
    V4 bs = pick(sig), bb = pick(beta);
    const M4 active = mq_lt(be, V4(MQ_INF));
    mq_fit_lloyd(
        g.t,
        g.cc,
        g.ct,
        g.m,
        V4(S0),
        V4(T1),
        V4(T2),
        V4(nb),
        bs,
        bb,
        pick(S1),
        pick(S2),
        pick(S3),
        active,
        be,
        bs,
        bb);
    _mm_storeu_ps(best_e, be.v);
    _mm_storeu_ps(best_s, bs.v);
    _mm_storeu_ps(best_b, bb.v);
  }

  static float
  error(const mq_fit_slots& g, float s, float b, float inv, float nb, bool mm, float ms, float mb) {
    const V8 vs(s), vb(b), vinv(inv), vnb(nb), vms(ms), vmb(mb);
    V8 acc(0.0f);
    for (int j = 0; j < g.m; j += 8) {
      const V8 v(_mm256_loadu_ps(g.w + j)), c(_mm256_loadu_ps(g.cc + j));
      const V8 q = mm ? mq_fit_clamp(mq_rint(mq_div(v - vmb, vms)), vnb)
                      : mq_fit_clamp(mq_rint((v - vb) * vinv), vnb);
      acc = acc + V8(_mm256_and_ps(mq_fit_term<V8, rt8<T>>(v, c, q, vs, vb).v, tail_mask(j, g.m)));
    }
    alignas(32) float a[8];
    _mm256_store_ps(a, acc.v);
    return mq_fit_tree8(a);
  }

  // Step 4: error() of the 2 biases of one scale at a time, their passes over the
  // slots interleaved (two independent chains). Up to 4 bits, the reconstruction
  // w_hat = round_T(round_T(q s) + b) of each code q comes from a table of the 16 codes'
  // values made per pair with the same operations (equal but for the sign of a zero
  // w_hat, which (v - w_hat)^2 drops).
  static void errors(
      const mq_fit_slots& g,
      const float* s,
      const float* b,
      const float* inv,
      const bool* ok,
      float nb,
      float* e) {
    static_assert(MQ_FIT_PAIRS == 4, "2 scales x 2 biases");
    if (nb <= 15.0f) {
      return errors_table(g, s, b, inv, ok, nb, e);
    }
    const V8 vnb(nb);
    for (int i0 = 0; i0 < MQ_FIT_PAIRS; i0 += 2) {
      // One scale per pair; 1 / s per lane (an invalid pair has inv = 1).
      const V8 vs(s[i0]), i0v(inv[i0]), i1v(inv[i0 + 1]);
      const V8 b0(b[i0]), b1(b[i0 + 1]);
      V8 a0(0.0f), a1(0.0f);
      for (int j = 0; j < g.m; j += 8) {
        const V8 v(_mm256_loadu_ps(g.w + j)), c(_mm256_loadu_ps(g.cc + j));
        const __m256 tm = tail_mask(j, g.m);
        const V8 q0 = mq_fit_clamp(mq_rint((v - b0) * i0v), vnb);
        const V8 q1 = mq_fit_clamp(mq_rint((v - b1) * i1v), vnb);
        a0 = a0 + V8(_mm256_and_ps(mq_fit_term<V8, rt8<T>>(v, c, q0, vs, b0).v, tm));
        a1 = a1 + V8(_mm256_and_ps(mq_fit_term<V8, rt8<T>>(v, c, q1, vs, b1).v, tm));
      }
      const V8* acc[2] = {&a0, &a1};
      for (int d = 0; d < 2; ++d) {
        alignas(32) float x[8];
        _mm256_store_ps(x, acc[d]->v);
        e[i0 + d] = ok[i0 + d] ? mq_fit_tree8(x) : MQ_INF;
      }
    }
  }
  static void errors_table(
      const mq_fit_slots& g,
      const float* s,
      const float* b,
      const float* inv,
      const bool* ok,
      float nb,
      float* e) {
    const V8 vnb(nb);
    const V8 k0(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)),
        k1(_mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15));
    const bool two = nb > 7.0f;
    for (int i0 = 0; i0 < MQ_FIT_PAIRS; i0 += 2) {
      const V8 vs(s[i0]);
      V8 bb[2], iv[2], lo[2], hi[2], acc[2];
      for (int d = 0; d < 2; ++d) {
        bb[d] = V8(b[i0 + d]);
        iv[d] = V8(inv[i0 + d]);
        lo[d] = rt8<T>::round(rt8<T>::round(k0 * vs) + bb[d]);
        hi[d] = two ? rt8<T>::round(rt8<T>::round(k1 * vs) + bb[d]) : lo[d];
        acc[d] = V8(0.0f);
      }
      for (int j = 0; j < g.m; j += 8) {
        const V8 v(_mm256_loadu_ps(g.w + j)), c(_mm256_loadu_ps(g.cc + j));
        const __m256 tm = tail_mask(j, g.m);
        for (int d = 0; d < 2; ++d) {
          const V8 q = mq_fit_clamp(mq_rint((v - bb[d]) * iv[d]), vnb);
          const __m256i k = _mm256_cvttps_epi32(q.v);
          __m256 w = _mm256_permutevar8x32_ps(lo[d].v, k);
          if (two) {
            w = _mm256_blendv_ps(
                w,
                _mm256_permutevar8x32_ps(hi[d].v, k),
                _mm256_castsi256_ps(_mm256_slli_epi32(k, 28)));
          }
          const V8 r = v - V8(w);
          acc[d] = acc[d] + V8(_mm256_and_ps((c * (r * r)).v, tm));
        }
      }
      for (int d = 0; d < 2; ++d) {
        alignas(32) float x[8];
        _mm256_store_ps(x, acc[d].v);
        e[i0 + d] = ok[i0 + d] ? mq_fit_tree8(x) : MQ_INF;
      }
    }
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
