// Arithmetic shared by the CPU and Metal twins of moequant's ops.
//
// Written in the common subset of C++20 and the Metal Shading Language, so both
// compile the exact same rules and stay bit-identical by construction. Nothing
// here may use the C++ standard library (the Metal lint rejects `std::`).
#pragma once

// No fused multiply-add contraction: w = q * s and (w - bias) / scale must each round
// as in the CPU oracle. (Host builds pass -ffp-contract=off for the same reason.)
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#ifdef __METAL_VERSION__
#include <metal_stdlib>
#define MQ_INLINE inline
#define MQ_RINT(x) metal::rint(x)
// The contract needs IEEE division (correctly rounded). The Metal spec lists x / y as
// correctly rounded but lets fast math ignore rounding; mq_div_rn below makes the
// quotient exact from any divide within a few ulps, so the codes do not depend on it.
#define MQ_DIV(a, b) mq_div_rn((a), (b))
#define MQ_ABS(x) metal::fabs(x)
#define MQ_THREAD thread
typedef uint mq_u32;
typedef ulong mq_u64;
#else
#define MQ_THREAD
#define MQ_INLINE inline
#define MQ_RINT(x) __builtin_rintf(x)
#define MQ_DIV(a, b) ((a) / (b))
#define MQ_ABS(x) __builtin_fabsf(x)
typedef unsigned int mq_u32;
typedef unsigned long long mq_u64;
#endif

#ifdef __METAL_VERSION__
// The float next to a finite, non-zero q towards +inf (up) or -inf.
MQ_INLINE float mq_next(float q, bool up) {
  const uint u = metal::as_type<uint>(q);
  return metal::as_type<float>((q > 0.0f) == up ? u + 1u : u - 1u);
}

// a / b rounded to nearest, ties to even: what IEEE division (the CPU) gives, from a
// hardware quotient that may be a few ulps off. The residual a - q*b is exact in one
// fma once q is within an ulp of a/b (and is still of the right sign and far beyond
// the bounds while it is not), and the bounds, half the gaps to q's neighbours times
// |b|, are exact products of a power of two; so each step moves q one ulp towards the
// exact quotient until it is the correctly rounded one. Four steps cover a 3-ulp start.
// Assumes normal-range operands and quotient (no flush-to-zero effects), which
// requantization's scales and weights are.
MQ_INLINE float mq_div_rn(float a, float b) {
  float q = metal::precise::divide(a, b);
  if (q == 0.0f || metal::isinf(q) || metal::isnan(q)) {
    return q;
  }
  const float ab = MQ_ABS(b);
  for (int i = 0; i < 4; ++i) {
    const float r = metal::fma(-q, b, a);
    const float rs = b < 0.0f ? -r : r; // (a/b - q) * |b|
    const float hi = 0.5f * (mq_next(q, true) - q) * ab;
    const float lo = 0.5f * (q - mq_next(q, false)) * ab;
    const bool odd = (metal::as_type<uint>(q) & 1u) != 0u;
    if (rs > hi || (rs == hi && odd)) {
      q = mq_next(q, true);
    } else if (rs < -lo || (rs == -lo && odd)) {
      q = mq_next(q, false);
    } else {
      break;
    }
  }
  return q;
}
#endif

// Decoding a compressed-tensors INT4 code: stored as u = q + 8, weight = q * scale.
#define MQ_INT4_OFFSET 8

// Affine group parameters, exactly as MLX's CPU `mx.quantize` derives them
// (float32 throughout, true division, rint = round half to even).
struct mq_affine {
  float scale;
  float bias;
};

MQ_INLINE mq_affine mq_affine_params(float wmin, float wmax, float n_bins) {
  const float eps = 1e-7f;
  // Pin zero to a grid point: the edge with the larger magnitude becomes the bias
  // and the scale is stretched so that -q0 * scale lands exactly on zero.
  bool neg = MQ_ABS(wmin) > MQ_ABS(wmax);
  float s = MQ_DIV(wmax - wmin, n_bins);
  s = s < eps ? eps : s;
  s = neg ? s : -s;
  float edge = neg ? wmin : wmax;
  float q0 = MQ_RINT(MQ_DIV(edge, s));
  mq_affine p;
  p.scale = s;
  p.bias = 0.0f;
  if (q0 != 0.0f) {
    p.scale = MQ_DIV(edge, q0);
    p.bias = edge;
  }
  return p;
}

// The affine code of one weight: clamp(rint((w - bias) / scale), 0, n_bins).
MQ_INLINE mq_u32 mq_affine_code(float w, mq_affine p, float n_bins) {
  float x = MQ_RINT(MQ_DIV(w - p.bias, p.scale));
  x = x < 0.0f ? 0.0f : x;
  x = x > n_bins ? n_bins : x;
  return (mq_u32)x;
}

// Packs 8 codes of B bits, held one per byte of a little-endian 64-bit word, into the
// low 8*B bits: MLX's bitstream (code i at bits [i*B, (i+1)*B)). Three merge steps,
// each joining neighbouring lanes, instead of eight shifts.
template <int B>
MQ_INLINE mq_u64 mq_pack8(mq_u64 x) {
  x = (x & 0x00FF00FF00FF00FFull) | ((x & 0xFF00FF00FF00FF00ull) >> (8 - B));
  x = (x & 0x0000FFFF0000FFFFull) | ((x & 0xFFFF0000FFFF0000ull) >> (16 - 2 * B));
  x = (x & 0x00000000FFFFFFFFull) | ((x & 0xFFFFFFFF00000000ull) >> (32 - 4 * B));
  return x;
}

// Code i of a run of B-bit codes packed from bit 0 of the words w[0..]: MLX's
// little-endian bitstream. A code that straddles two words takes its high bits from
// the next one. With i and B known at compile time this folds to one or two shifts.
template <int B>
MQ_INLINE mq_u32 mq_unpack(MQ_THREAD const mq_u32* w, int i) {
  const int pos = i * B;
  const int wi = pos >> 5;
  const int sh = pos & 31;
  mq_u32 v = w[wi] >> sh;
  if (sh + B > 32) {
    v |= w[wi + 1] << (32 - sh);
  }
  return v & ((1u << B) - 1u);
}
