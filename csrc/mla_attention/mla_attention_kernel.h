// The per-chunk kernel of mla_decode_attention (see mla_attention_cpu.h), written with
// GCC/Clang vector extensions: compiled once for the baseline ISA and once with
// AVX2+FMA (mla_attention_avx2.cpp). The including file defines MLA_NS, so the two
// copies have distinct symbols (nothing inline is shared that a linker could merge).
#ifndef MLA_NS
#error "define MLA_NS before including mla_attention_kernel.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "mla_attention/mla_attention_cpu.h"

// 32-byte vectors in internal functions only: the baseline copy's ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace moequant::cpu::MLA_NS {

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 ld(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void st(float* p, v8 v) {
  std::memcpy(p, &v, sizeof(v));
}
inline v8 splat(float x) {
  return v8{x, x, x, x, x, x, x, x};
}
// The sums of a, b, c, d in lanes 0..3 (lanes 4..7 repeat them): a transposed
// reduction, 3 adds and 6 shuffles for 4 sums, in a fixed order on every ISA.
inline v8 hsum4(v8 a, v8 b, v8 c, v8 d) {
  const v8 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
      __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  const v8 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
      __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  // x = [a', a'', c', c'', b', b'', d', d'']
  const v8 x = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
      __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(x, x, 0, 4, 2, 6, 0, 4, 2, 6) +
      __builtin_shufflevector(x, x, 1, 5, 3, 7, 1, 5, 3, 7);
}

// e^x of 8 lanes (Cephes' expf: 2^n e^r, |r| <= ln2/2, degree-5 polynomial; within 2
// ulp of expf for x in [-87, 88], clamped outside, NaN kept): the softmax's weights
// without a libm call per score.
inline v8 exp8(v8 x) {
  const v8i nan = x != x;
  v8 y = x < splat(-87.0f) ? splat(-87.0f) : x;
  y = y > splat(88.0f) ? splat(88.0f) : y;
  const v8 fx = y * splat(1.44269504088896341f) + splat(0.5f);
  v8 t = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8);
  t = t > fx ? t - splat(1.0f) : t; // floor
  const v8 r = (y - t * splat(0.693359375f)) - t * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  const v8i n = __builtin_convertvector(t, v8i);
  return nan ? x : p * (v8)((n + 127) << 23); // 2^n from its exponent bits
}

inline float to_float(const void* p, int64_t i, MlaDtype t) {
  if (t == MlaDtype::f32) {
    return static_cast<const float*>(p)[i];
  }
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (t == MlaDtype::bf16) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  // IEEE half -> float, exact (subnormals, inf and NaN included).
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t e = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (e == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (e != 0) {
    u = sign | ((e + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {
    // Subnormal: normalise.
    e = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --e;
    }
    u = sign | (e << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Dequantizes one cached row of n values (groups of gs) to float: s * q + b.
template <int BITS>
inline void decode_row(
    const uint8_t* w,
    const void* s,
    const void* b,
    int64_t g0,
    int n,
    int gs,
    MlaDtype t,
    float* out) {
  for (int g = 0; g < n / gs; ++g) {
    const float sc = to_float(s, g0 + g, t);
    const float bi = to_float(b, g0 + g, t);
    float* o = out + g * gs;
    if constexpr (BITS == 8) {
      const uint8_t* c = w + g * gs;
      for (int i = 0; i < gs; ++i) {
        o[i] = float(c[i]) * sc + bi;
      }
    } else {
      const uint8_t* c = w + g * gs / 2;
      for (int i = 0; i < gs / 2; ++i) {
        o[2 * i] = float(c[i] & 15) * sc + bi;
        o[2 * i + 1] = float(c[i] >> 4) * sc + bi;
      }
    }
  }
}

// Dot products of 2 query rows with 4 cached rows (n a multiple of 8).
inline void
dots_2x4(const float* q0, const float* q1, const float* r, int64_t rs, int n, v8 (&a)[2][4]) {
  for (int k = 0; k < n; k += 8) {
    const v8 x0 = ld(q0 + k), x1 = ld(q1 + k);
    for (int j = 0; j < 4; ++j) {
      const v8 y = ld(r + j * rs + k);
      a[0][j] += x0 * y;
      a[1][j] += x1 * y;
    }
  }
}

template <int BITS>
void chunk_impl(
    const MlaArgs& a,
    int b,
    int t0,
    int t1,
    int h0,
    int h1,
    float* m,
    float* l,
    float* acc,
    float* scratch) {
  const int R = a.R, DR = a.DR, gs = a.group_size, nh = h1 - h0;
  const int64_t wl = int64_t(R) * BITS / 8, wp = int64_t(DR) * BITS / 8;
  const int64_t gl = R / gs, gp = DR / gs;
  const int64_t rs = R + DR; // a decoded row: latent then rope part
  float* rows = scratch; // kMlaBlock x (R + DR)
  float* p = rows + int64_t(kMlaBlock) * rs; // nh x kMlaBlock scores, then weights
  const float* ql = a.q_lat + (int64_t(b) * a.H) * R;
  const float* qp = a.q_pe + (int64_t(b) * a.H) * DR;
  for (int h = 0; h < nh; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
  }
  for (int64_t i = 0; i < int64_t(nh) * R; ++i) {
    acc[i] = 0.0f;
  }
  for (int tb = t0; tb < t1; tb += kMlaBlock) {
    const int nb = t1 - tb < kMlaBlock ? t1 - tb : kMlaBlock;
    // Decode the block once; every head of this chunk reads it from cache.
    for (int j = 0; j < nb; ++j) {
      const int64_t t = int64_t(b) * a.T + tb + j;
      decode_row<BITS>(a.lat_w + t * wl, a.lat_s, a.lat_b, t * gl, R, gs, a.sdtype, rows + j * rs);
      decode_row<BITS>(
          a.pe_w + t * wp, a.pe_s, a.pe_b, t * gp, DR, gs, a.sdtype, rows + j * rs + R);
    }
    // Rows past the block's end (up to a multiple of 4) are zeros; their scores unused.
    for (int j = nb; j < ((nb + 3) & ~3); ++j) {
      std::memset(rows + j * rs, 0, sizeof(float) * rs);
    }
    // Scores, 2 heads x 4 positions at a time: the latent and rope dots accumulate in
    // the same registers, reduced 4 at a time (rows past nb are zeros; their scores are
    // written to p but never read).
    for (int h = 0; h < nh; h += 2) {
      const int hh = h + 1 < nh ? h + 1 : h; // odd tail: recompute the last head
      for (int j = 0; j < nb; j += 4) {
        v8 d[2][4] = {};
        dots_2x4(ql + int64_t(h0 + h) * R, ql + int64_t(h0 + hh) * R, rows + j * rs, rs, R, d);
        dots_2x4(
            qp + int64_t(h0 + h) * DR, qp + int64_t(h0 + hh) * DR, rows + j * rs + R, rs, DR, d);
        const v8 s0 = hsum4(d[0][0], d[0][1], d[0][2], d[0][3]) * splat(a.scale);
        const v8 s1 = hsum4(d[1][0], d[1][1], d[1][2], d[1][3]) * splat(a.scale);
        std::memcpy(p + h * kMlaBlock + j, &s0, 4 * sizeof(float));
        std::memcpy(p + hh * kMlaBlock + j, &s1, 4 * sizeof(float));
      }
    }
    // Online softmax: rescale a head's running sums when its max grows.
    for (int h = 0; h < nh; ++h) {
      float* ph = p + h * kMlaBlock;
      float mb = m[h];
      for (int j = 0; j < nb; ++j) {
        mb = ph[j] > mb ? ph[j] : mb;
      }
      if (mb > m[h]) {
        const float alpha = m[h] == -INFINITY ? 0.0f : std::exp(m[h] - mb);
        l[h] *= alpha;
        float* ah = acc + int64_t(h) * R;
        for (int r = 0; r < R; r += 8) {
          st(ah + r, ld(ah + r) * splat(alpha));
        }
        m[h] = mb;
      }
      // A NaN score (NaN query) propagates through sum and acc.
      for (int j = 0; j < kMlaBlock; j += 8) {
        st(ph + j, exp8(ld(ph + j) - splat(mb)));
      }
      float sum = 0.0f;
      for (int j = 0; j < nb; ++j) {
        sum += ph[j];
      }
      l[h] += sum;
    }
    // acc[h] += sum_j p[h][j] * latent_j, 32 values x 2 heads per register block (each
    // weight broadcast once per 4 row vectors).
    for (int h = 0; h < nh; h += 2) {
      const bool two = h + 1 < nh;
      float* a0 = acc + int64_t(h) * R;
      float* a1 = acc + int64_t(two ? h + 1 : h) * R;
      const float* p0 = p + h * kMlaBlock;
      const float* p1 = p + (two ? h + 1 : h) * kMlaBlock;
      for (int r = 0; r < R; r += 32) {
        v8 x[4], y[4];
        for (int q = 0; q < 4; ++q) {
          x[q] = ld(a0 + r + 8 * q);
          y[q] = ld(a1 + r + 8 * q);
        }
        for (int j = 0; j < nb; ++j) {
          const float* w = rows + j * rs + r;
          const v8 s0 = splat(p0[j]), s1 = splat(p1[j]);
          for (int q = 0; q < 4; ++q) {
            const v8 wq = ld(w + 8 * q);
            x[q] += s0 * wq;
            y[q] += s1 * wq;
          }
        }
        for (int q = 0; q < 4; ++q) {
          st(a0 + r + 8 * q, x[q]);
          if (two) {
            st(a1 + r + 8 * q, y[q]);
          }
        }
      }
    }
  }
}

} // namespace

void chunk(
    const MlaArgs& a,
    int b,
    int t0,
    int t1,
    int h0,
    int h1,
    float* m,
    float* l,
    float* acc,
    float* scratch) {
  if (a.bits == 8) {
    chunk_impl<8>(a, b, t0, t1, h0, h1, m, l, acc, scratch);
  } else {
    chunk_impl<4>(a, b, t0, t1, h0, h1, m, l, acc, scratch);
  }
}

} // namespace moequant::cpu::MLA_NS
