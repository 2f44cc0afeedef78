// The error-optimal affine fit (fit="mse") of one group: shared by the CPU kernels
// (csrc/requantize/fit_cpu.cpp, fit_avx2.cpp) and the Metal kernel
// (metal/requantize_fit.metal). python/moequant/testing/fit_reference.py is the
// executable specification; this header is its arithmetic, op for op, in float32
// (no FMA contraction, see quant_math.h; true divisions through MQ_DIV; fixed orders).
//
// A group is n slots (value v, weight c, present p), n a multiple of 8, at most
// MQ_FIT_MAX_SLOTS: one slot per weight for float input, one per (source block of 32,
// nibble) for INT4 input. Every sum runs over the m weighted slots (c > 0) only, in
// slot order (the others add nothing). The steps (details in fit_reference.py):
//   1. min-max as mx.quantize, its exact error E_mm;
//   2. t = (v - min) * (1 / R); a 4 x 4 grid of candidate ranges (its window depends
//      on the bits), each with its codes, the closed-form 2x2 least squares and its
//      error;
//   3. Lloyd from the best MQ_FIT_STARTS candidates;
//   4. the best fit in weight units rounded to the output dtype T and the 2 x 2 T
//      values around it (scale and bias each: the rounded value and its neighbour on
//      the other side of the exact one), codes re-assigned, exact errors;
//   5. the fit replaces min-max only when its error is below E_mm (1 - 2^-12).
// The driver mq_fit_group is generic over a backend B that evaluates steps 1-4 on its
// vectors (mq_fit_scalar below; AVX2 in fit_avx2.cpp): min/max, the t statistics, the
// candidates, the choice of the starts, Lloyd and the neighbours' errors. Per lane the
// operations are the generic templates here, and where a backend reorders work it
// only skips exact no-ops (adding +-0) or takes the scalar loop for the inputs where
// order would matter, so every backend gives the same bits.
#pragma once

#include "quant_math.h"

// Candidates per axis: a, b = (i - 2) * 0.08 (negative widens the range) for
// i = mq_fit_grid_first(n) + 0..3: the window of the former 6 x 6 grid (i = 0..5) where
// its best candidates lie at each bit width (fit_reference.py): 16 candidates, same error.
#define MQ_FIT_GRID 4
#define MQ_FIT_GRID_OFFSET 2
#define MQ_FIT_GRID_STEP 0.08f
#define MQ_FIT_NCAND (MQ_FIT_GRID * MQ_FIT_GRID)
#define MQ_FIT_STARTS 4
#define MQ_FIT_LLOYD_CAP 2
#define MQ_FIT_PAIRS 4 // step 4: 2 scales x 2 biases (fit_reference.PAIRS)
#define MQ_FIT_ACCEPT 0.000244140625f // 2^-12
#define MQ_FIT_MAX_SLOTS 128

#ifdef __METAL_VERSION__
#define MQ_INF INFINITY
#else
#define MQ_INF __builtin_inff()
#endif

// ---- per-lane operations, generic over float or a SIMD vector F ---------------------
// A backend vector type provides +, -, *, mq_div, mq_rint, mq_lt, mq_eq, mq_and,
// mq_andnot, mq_sel(mask, a, b) with the semantics of the float versions here.

MQ_INLINE float mq_div(float a, float b) {
  return MQ_DIV(a, b);
}
MQ_INLINE float mq_rint(float x) {
  return MQ_RINT(x);
}
MQ_INLINE bool mq_lt(float a, float b) {
  return a < b;
}
MQ_INLINE bool mq_eq(float a, float b) {
  return a == b;
}
MQ_INLINE bool mq_and(bool a, bool b) {
  return a && b;
}
MQ_INLINE bool mq_andnot(bool a, bool b) { // !a && b
  return !a && b;
}
MQ_INLINE float mq_sel(bool m, float a, float b) {
  return m ? a : b;
}
MQ_INLINE bool mq_any(bool m) {
  return m;
}

// clamp(x, 0, n) as `x < 0 ? 0 : x`, then `n < x ? n : x`.
template <typename F>
MQ_INLINE F mq_fit_clamp(F x, F n) {
  x = mq_sel(mq_lt(x, F(0.0f)), F(0.0f), x);
  return mq_sel(mq_lt(n, x), n, x);
}

// Least squares t ~ sig * q + beta from the code statistics, and its error
// T2 - sig S3 - beta T1; invalid fits (det <= 0 or sig <= 0, NaN included) get +inf.
template <typename F, typename M>
MQ_INLINE void mq_fit_solve(
    F S0, F T1, F T2, F S1, F S2, F S3,
    MQ_THREAD F& sig, MQ_THREAD F& beta, MQ_THREAD F& err, MQ_THREAD M& ok) {
  F det = S2 * S0 - S1 * S1;
  sig = mq_div(S3 * S0 - S1 * T1, det);
  beta = mq_div(S2 * T1 - S1 * S3, det);
  err = (T2 - sig * S3) - beta * T1;
  ok = mq_and(mq_lt(F(0.0f), det), mq_lt(F(0.0f), sig));
  err = mq_sel(ok, err, F(MQ_INF));
}

// S1 = sum c q, S2 = sum (c q) q, S3 = sum (c t) q over the slots in order, with
// q = clamp(rint((t - lo) * inv), 0, n).
template <typename F>
MQ_INLINE void mq_fit_stats(
    const MQ_THREAD float* t, const MQ_THREAD float* c, const MQ_THREAD float* ct, int n,
    F lo, F inv, F nb, MQ_THREAD F& S1, MQ_THREAD F& S2, MQ_THREAD F& S3) {
  S1 = F(0.0f);
  S2 = F(0.0f);
  S3 = F(0.0f);
  for (int j = 0; j < n; ++j) {
    F q = mq_fit_clamp(mq_rint((F(t[j]) - lo) * inv), nb);
    F cq = F(c[j]) * q;
    S1 = S1 + cq;
    S2 = S2 + cq * q;
    S3 = S3 + F(ct[j]) * q;
  }
}

// Candidate k of the grid: lo = a and inv = 1 / s, s = ((1 - a) - b) / n, with
// a = value(first + k / GRID), b = value(first + k % GRID).
MQ_INLINE float mq_fit_grid_value(int i) {
  return float(i - MQ_FIT_GRID_OFFSET) * MQ_FIT_GRID_STEP;
}
// First grid index at n = 2^bits - 1: 2 up to 2 bits, 1 at 3 bits, 0 above.
MQ_INLINE int mq_fit_grid_first(float n) {
  return n < 4.0f ? 2 : (n < 8.0f ? 1 : 0);
}

// Lloyd iterations for a vector of starts (lanes). `active` lanes iterate until
// their code statistics repeat (a fixed point: further rounds change nothing, so
// lanes of one vector may run extra rounds) or the cap; the best error seen per lane
// is kept (strict <).
template <typename F, typename M>
MQ_INLINE void mq_fit_lloyd(
    const MQ_THREAD float* t, const MQ_THREAD float* c, const MQ_THREAD float* ct, int n,
    F S0, F T1, F T2, F nb, F sig, F beta, F P1, F P2, F P3, M active,
    MQ_THREAD F& best_e, MQ_THREAD F& best_s, MQ_THREAD F& best_b) {
  for (int it = 0; it < MQ_FIT_LLOYD_CAP; ++it) {
    if (!mq_any(active)) {
      break;
    }
    F inv = mq_div(F(1.0f), sig);
    F N1, N2, N3;
    mq_fit_stats(t, c, ct, n, beta, inv, nb, N1, N2, N3);
    F s2, b2, e2;
    M valid;
    mq_fit_solve(S0, T1, T2, N1, N2, N3, s2, b2, e2, valid);
    active = mq_and(active, valid);
    M better = mq_and(active, mq_lt(e2, best_e));
    best_e = mq_sel(better, e2, best_e);
    best_s = mq_sel(better, s2, best_s);
    best_b = mq_sel(better, b2, best_b);
    M same = mq_and(mq_and(mq_eq(N1, P1), mq_eq(N2, P2)), mq_eq(N3, P3));
    active = mq_andnot(same, active);
    sig = mq_sel(active, s2, sig);
    beta = mq_sel(active, b2, beta);
    P1 = N1;
    P2 = N2;
    P3 = N3;
  }
}

// ---- the output dtype T -------------------------------------------------------------
// mq_t<T>: round a float to T (nearest, ties to even) and back; step to the
// neighbouring T value. Specialized per platform below for T's bit pattern.

template <typename T>
MQ_INLINE float mq_round_t(float x) {
  return float(T(x));
}

#ifdef __METAL_VERSION__
// T's bit pattern (CPU twins in csrc/requantize/fit_cpu.h).
template <typename T>
struct mq_tbits;
template <>
struct mq_tbits<float> {
  static uint get(float x) { return metal::as_type<uint>(x); }
  static float put(uint b) { return metal::as_type<float>(b); }
  static uint sign() { return 0x80000000u; }
};
template <>
struct mq_tbits<half> {
  static uint get(float x) { return uint(metal::as_type<ushort>(half(x))); }
  static float put(uint b) { return float(metal::as_type<half>(ushort(b))); }
  static uint sign() { return 0x8000u; }
};
template <>
struct mq_tbits<bfloat> {
  static uint get(float x) { return metal::as_type<uint>(x) >> 16; }
  static float put(uint b) { return metal::as_type<float>(b << 16); }
  static uint sign() { return 0x8000u; }
};
#endif

// The T value next to x (a finite T value) towards +inf (d > 0) or -inf (d < 0).
template <typename T, typename Bits>
MQ_INLINE float mq_step_t(float x, int d) {
  if (d == 0) {
    return x;
  }
  mq_u32 b = Bits::get(x);
  const mq_u32 sign = Bits::sign();
  if ((b & ~sign) == 0u) {
    b = d > 0 ? 1u : (sign | 1u);
  } else if ((x > 0.0f) == (d > 0)) {
    b = b + 1u;
  } else {
    b = b - 1u;
  }
  return Bits::put(b);
}

// One slot of the exact reconstruction error: code, then
// c * (v - round_T(round_T(q * s) + b))^2. RT rounds a lane to T.
template <typename F, typename RT>
MQ_INLINE F mq_fit_term(F v, F c, F q, F s, F b) {
  F d = RT::round(RT::round(q * s) + b);
  F r = v - d;
  return c * (r * r);
}

// ---- the scalar backend (the CPU scalar path and the Metal kernel) ------------------

// Rounding of scalar lanes to T.
template <typename T>
struct mq_rt_scalar {
  static MQ_INLINE float round(float x) { return mq_round_t<T>(x); }
};

// Group data handed to a backend.
// v, c: the n slots. w, cc: v and c of the m weighted slots (c > 0) in slot order, set
// by minmax; t, ct: their (v - min) / R and c t, set by tstats. (8 floats of slack
// each: vector backends pad the last vector.)
struct mq_fit_slots {
  float v[MQ_FIT_MAX_SLOTS];
  float c[MQ_FIT_MAX_SLOTS];
  float w[MQ_FIT_MAX_SLOTS + 8];
  float cc[MQ_FIT_MAX_SLOTS + 8];
  float t[MQ_FIT_MAX_SLOTS + 8];
  float ct[MQ_FIT_MAX_SLOTS + 8];
  int n;
  int m;
};

// Combination of the 8 interleaved partial sums.
MQ_INLINE float mq_fit_tree8(const MQ_THREAD float* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

template <typename T>
struct mq_fit_scalar {
  // Step 1: MLX's min/max loop over the present slots (NaN never taken), and whether
  // every present value and every weight is finite; g.w, g.cc, g.m: the weighted slots.
  static MQ_INLINE void minmax(
      MQ_THREAD mq_fit_slots& g, const MQ_THREAD bool* present, MQ_THREAD float& wmin,
      MQ_THREAD float& wmax, MQ_THREAD bool& finite) {
    wmin = MQ_INF;
    wmax = -MQ_INF;
    finite = true;
    int m = 0;
    for (int j = 0; j < g.n; ++j) {
      if (present[j]) {
        const float x = g.v[j];
        wmin = x < wmin ? x : wmin;
        wmax = wmax < x ? x : wmax;
        finite = finite && (x - x == 0.0f);
      }
      finite = finite && (g.c[j] - g.c[j] == 0.0f);
      if (g.c[j] > 0.0f) {
        g.w[m] = g.v[j];
        g.cc[m] = g.c[j];
        ++m;
      }
    }
    g.m = m;
  }
  // t = (v - min) * (1 / R), c t and the sums S0 = sum c, T1 = sum c t,
  // T2 = sum (c t) t over the weighted slots in order.
  static MQ_INLINE void tstats(
      MQ_THREAD mq_fit_slots& g, float wmin, float invR, MQ_THREAD float& S0,
      MQ_THREAD float& T1, MQ_THREAD float& T2) {
    S0 = 0.0f;
    T1 = 0.0f;
    T2 = 0.0f;
    for (int j = 0; j < g.m; ++j) {
      const float t = (g.w[j] - wmin) * invR;
      const float ct = g.cc[j] * t;
      S0 = S0 + g.cc[j];
      T1 = T1 + ct;
      T2 = T2 + ct * t;
      g.t[j] = t;
      g.ct[j] = ct;
    }
  }
  // The best MQ_FIT_STARTS candidates by error in stable order (strict <, the first of
  // equal errors kept; NaN and +inf never taken): bi[r] = index or -1.
  static MQ_INLINE void select(const MQ_THREAD float* err, MQ_THREAD int* bi) {
    float be[MQ_FIT_STARTS];
    for (int r = 0; r < MQ_FIT_STARTS; ++r) {
      be[r] = MQ_INF;
      bi[r] = -1;
    }
    for (int k = 0; k < MQ_FIT_NCAND; ++k) {
      const float e = err[k];
      if (e < be[MQ_FIT_STARTS - 1]) {
        int p = MQ_FIT_STARTS - 1;
        while (p > 0 && e < be[p - 1]) {
          be[p] = be[p - 1];
          bi[p] = bi[p - 1];
          --p;
        }
        be[p] = e;
        bi[p] = k;
      }
    }
  }
  // Step 2: every candidate's least-squares fit (sig, beta, err) and its statistics.
  static MQ_INLINE void candidates(
      const MQ_THREAD mq_fit_slots& g, float S0, float T1, float T2, float nb,
      MQ_THREAD float* sig, MQ_THREAD float* beta, MQ_THREAD float* err,
      MQ_THREAD float* S1, MQ_THREAD float* S2, MQ_THREAD float* S3) {
    const int first = mq_fit_grid_first(nb);
    for (int k = 0; k < MQ_FIT_NCAND; ++k) {
      const float a = mq_fit_grid_value(first + k / MQ_FIT_GRID);
      const float b = mq_fit_grid_value(first + k % MQ_FIT_GRID);
      const float inv = MQ_DIV(1.0f, MQ_DIV((1.0f - a) - b, nb));
      mq_fit_stats(g.t, g.cc, g.ct, g.m, a, inv, nb, S1[k], S2[k], S3[k]);
      bool ok;
      mq_fit_solve(S0, T1, T2, S1[k], S2[k], S3[k], sig[k], beta[k], err[k], ok);
    }
  }
  // Step 3 from the starts bi[r] (rank order; -1: none, error +inf) of the candidates'
  // (sig, beta, err, S1, S2, S3); per start the best (err, sig, beta).
  static MQ_INLINE void lloyd(
      const MQ_THREAD mq_fit_slots& g, float S0, float T1, float T2, float nb,
      const MQ_THREAD int* bi, const MQ_THREAD float* sig, const MQ_THREAD float* beta,
      const MQ_THREAD float* err, const MQ_THREAD float* S1, const MQ_THREAD float* S2,
      const MQ_THREAD float* S3, MQ_THREAD float* best_e, MQ_THREAD float* best_s,
      MQ_THREAD float* best_b) {
    for (int r = 0; r < MQ_FIT_STARTS; ++r) {
      const int k = bi[r] < 0 ? 0 : bi[r];
      best_e[r] = bi[r] < 0 ? MQ_INF : err[k];
      best_s[r] = sig[k];
      best_b[r] = beta[k];
      mq_fit_lloyd(g.t, g.cc, g.ct, g.m, S0, T1, T2, nb, sig[k], beta[k], S1[k], S2[k],
                   S3[k], best_e[r] < MQ_INF, best_e[r], best_s[r], best_b[r]);
    }
  }
  // Step 4 / 1: the exact error with stored (s, b) over the weighted slots, the i-th
  // into partial sum i % 8; codes clamp(rint((v - b) * inv)) (mm = false) or MLX's
  // clamp(rint((v - mb) / ms)) with its unrounded (ms, mb).
  static MQ_INLINE float error(
      const MQ_THREAD mq_fit_slots& g, float s, float b, float inv, float nb, bool mm,
      float ms, float mb) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < g.m; ++j) {
      float q = mm ? mq_fit_clamp(MQ_RINT(MQ_DIV(g.w[j] - mb, ms)), nb)
                   : mq_fit_clamp(MQ_RINT((g.w[j] - b) * inv), nb);
      acc[j & 7] = acc[j & 7] + mq_fit_term<float, mq_rt_scalar<T>>(g.w[j], g.cc[j], q, s, b);
    }
    return mq_fit_tree8(acc);
  }
  // Step 4: the exact errors of the MQ_FIT_PAIRS pairs i (2 * scale + bias order);
  // e[i] only where ok[i].
  static MQ_INLINE void errors(
      const MQ_THREAD mq_fit_slots& g, const MQ_THREAD float* s, const MQ_THREAD float* b,
      const MQ_THREAD float* inv, const MQ_THREAD bool* ok, float nb, MQ_THREAD float* e) {
    for (int i = 0; i < MQ_FIT_PAIRS; ++i) {
      e[i] = ok[i] ? error(g, s[i], b[i], inv[i], nb, false, 0.0f, 0.0f) : MQ_INF;
    }
  }
};

// ---- the driver ---------------------------------------------------------------------

struct mq_fit_result {
  float scale; // T values, as float
  float bias;
  float inv; // codes: clamp(rint((v - bias) * inv)) when fit, else MLX's rule with mm
  mq_affine mm; // MLX's unrounded min-max parameters
  bool fit;
};

// The code of value v under the result (float32, as every backend computes it).
MQ_INLINE mq_u32 mq_fit_code(MQ_THREAD const mq_fit_result& r, float v, float nb) {
  float q = r.fit ? mq_fit_clamp(MQ_RINT((v - r.bias) * r.inv), nb)
                  : mq_fit_clamp(MQ_RINT(MQ_DIV(v - r.mm.bias, r.mm.scale)), nb);
  return q == q ? (mq_u32)q : 0u; // NaN (non-finite groups keep min-max): code 0
}

// g.v, g.c and n are set; present[j] marks slots that hold at least one weight.
template <typename T, typename Bits, typename B>
MQ_INLINE mq_fit_result mq_fit_group(
    MQ_THREAD mq_fit_slots& g, const MQ_THREAD bool* present, int bits) {
  const float nb = float((1 << bits) - 1);
  // MLX's min/max loop (NaN never taken), then its parameters.
  float wmin, wmax;
  bool finite;
  B::minmax(g, present, wmin, wmax, finite);
  mq_fit_result res;
  res.mm = mq_affine_params(wmin, wmax, nb);
  res.scale = mq_round_t<T>(res.mm.scale);
  res.bias = mq_round_t<T>(res.mm.bias);
  res.inv = 0.0f;
  res.fit = false;
  const float e_mm =
      B::error(g, res.scale, res.bias, 0.0f, nb, true, res.mm.scale, res.mm.bias);

  const float R = wmax - wmin;
  if (!(finite && R - R == 0.0f && R > 0.0f)) {
    return res;
  }
  const float invR = MQ_DIV(1.0f, R);
  float S0, T1, T2;
  B::tstats(g, wmin, invR, S0, T1, T2);

  // Step 2, then the best MQ_FIT_STARTS in stable order (strict <, first kept).
  float sig[MQ_FIT_NCAND], beta[MQ_FIT_NCAND], err[MQ_FIT_NCAND];
  float S1[MQ_FIT_NCAND], S2[MQ_FIT_NCAND], S3[MQ_FIT_NCAND];
  B::candidates(g, S0, T1, T2, nb, sig, beta, err, S1, S2, S3);
  int bi[MQ_FIT_STARTS];
  B::select(err, bi);
  if (bi[0] < 0) {
    return res;
  }
  // Step 3.
  float best_e[MQ_FIT_STARTS], best_s[MQ_FIT_STARTS], best_b[MQ_FIT_STARTS];
  B::lloyd(g, S0, T1, T2, nb, bi, sig, beta, err, S1, S2, S3, best_e, best_s, best_b);
  float e_t = best_e[0], s_t = best_s[0], b_t = best_b[0];
  for (int r = 1; r < MQ_FIT_STARTS; ++r) {
    if (best_e[r] < e_t) {
      e_t = best_e[r];
      s_t = best_s[r];
      b_t = best_b[r];
    }
  }
  if (!(e_t < MQ_INF)) {
    return res;
  }

  // Step 4: weight units, T; the pairs (s0, b0), (s0, b1), (s1, b0), (s1, b1) with s1,
  // b1 the T values next to s0, b0 on the other side of the exact values (below them
  // when exact).
  const float scale = s_t * R;
  const float bias = wmin + b_t * R;
  float sv[2], bv[2];
  sv[0] = mq_round_t<T>(scale);
  bv[0] = mq_round_t<T>(bias);
  sv[1] = mq_step_t<T, Bits>(sv[0], scale > sv[0] ? 1 : -1);
  bv[1] = mq_step_t<T, Bits>(bv[0], bias > bv[0] ? 1 : -1);
  float ns[MQ_FIT_PAIRS], nbias[MQ_FIT_PAIRS], ninv[MQ_FIT_PAIRS], ne[MQ_FIT_PAIRS];
  bool nok[MQ_FIT_PAIRS];
  for (int is = 0; is < 2; ++is) {
    const float sT = sv[is];
    const float invT = MQ_DIV(1.0f, sT); // used only where valid
    for (int ib = 0; ib < 2; ++ib) {
      const float bT = bv[ib];
      const int i = 2 * is + ib;
      nok[i] = sT - sT == 0.0f && sT != 0.0f && bT - bT == 0.0f;
      ns[i] = sT;
      nbias[i] = bT;
      ninv[i] = nok[i] ? invT : 1.0f;
    }
  }
  B::errors(g, ns, nbias, ninv, nok, nb, ne);
  float e_best = MQ_INF, s_best = 0.0f, b_best = 0.0f, i_best = 0.0f;
  for (int i = 0; i < MQ_FIT_PAIRS; ++i) {
    if (nok[i] && ne[i] < e_best) {
      e_best = ne[i];
      s_best = ns[i];
      b_best = nbias[i];
      i_best = ninv[i];
    }
  }
  // Step 5.
  if (e_best < e_mm - e_mm * MQ_FIT_ACCEPT) {
    res.scale = s_best;
    res.bias = b_best;
    res.inv = i_best;
    res.fit = true;
  }
  return res;
}
