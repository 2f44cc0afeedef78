// The CPU twin of metal/requantize.h.
//
// Unit of work: a block of 32 source weights = 16 bytes of packed nibbles. A block
// lies inside one source group (source groups are 32, 64 or 128 wide) and inside one
// output group (32, 64 or 128), so it has one source scale and one set of affine
// parameters. Each weight is (u - 8) * s for a nibble u, hence its code depends only
// on u: the block's 16 possible codes go into a table, computed with exactly the
// division and rounding of MLX's quantizer, and the 32 nibbles are looked up in it
// (pshufb on x86, tbl on arm64). Group min/max come from the nibble min/max, since
// u -> (u - 8) * s is monotone. The result is bit-identical to quantizing the
// dequantized weights, while reading each input byte once.
#include "requantize/requantize_cpu.h"

#include <cstring>
#include <limits>
#include <stdexcept>

#include "common/quant_formats.h"
#include "common/thread_pool.h"
#include "mlx/types/half_types.h"
#include "quant_math.h"

// MOEQUANT_NO_SIMD forces the portable path (tests build it to check it).
#if defined(MOEQUANT_NO_SIMD)
#elif defined(__SSSE3__)
#include <tmmintrin.h>
#define MQ_SIMD_SSSE3 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define MQ_SIMD_NEON 1
#endif

namespace moequant::cpu {

namespace mx = mlx::core;

namespace {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// The 32 codes of one block, in element order.
struct Block {
  alignas(16) uint8_t codes[32];
};

inline void nibble_range(const uint8_t* p, int& umin, int& umax) {
#if defined(MQ_SIMD_SSSE3)
  const __m128i m = _mm_set1_epi8(0x0F);
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i lo = _mm_and_si128(v, m);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
  __m128i mn = _mm_min_epu8(lo, hi);
  __m128i mx_ = _mm_max_epu8(lo, hi);
  mn = _mm_min_epu8(mn, _mm_srli_si128(mn, 8));
  mx_ = _mm_max_epu8(mx_, _mm_srli_si128(mx_, 8));
  mn = _mm_min_epu8(mn, _mm_srli_si128(mn, 4));
  mx_ = _mm_max_epu8(mx_, _mm_srli_si128(mx_, 4));
  mn = _mm_min_epu8(mn, _mm_srli_si128(mn, 2));
  mx_ = _mm_max_epu8(mx_, _mm_srli_si128(mx_, 2));
  mn = _mm_min_epu8(mn, _mm_srli_si128(mn, 1));
  mx_ = _mm_max_epu8(mx_, _mm_srli_si128(mx_, 1));
  umin = _mm_cvtsi128_si32(mn) & 0xFF;
  umax = _mm_cvtsi128_si32(mx_) & 0xFF;
#elif defined(MQ_SIMD_NEON)
  uint8x16_t v = vld1q_u8(p);
  uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0F));
  uint8x16_t hi = vshrq_n_u8(v, 4);
  umin = vminvq_u8(vminq_u8(lo, hi));
  umax = vmaxvq_u8(vmaxq_u8(lo, hi));
#else
  umin = 15;
  umax = 0;
  for (int i = 0; i < 16; ++i) {
    int a = p[i] & 0x0F, b = p[i] >> 4;
    umin = a < umin ? a : umin;
    umin = b < umin ? b : umin;
    umax = a > umax ? a : umax;
    umax = b > umax ? b : umax;
  }
#endif
}

inline void lookup_codes(const uint8_t* p, const uint8_t* lut, Block& out) {
#if defined(MQ_SIMD_SSSE3)
  const __m128i m = _mm_set1_epi8(0x0F);
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i t = _mm_load_si128(reinterpret_cast<const __m128i*>(lut));
  __m128i cl = _mm_shuffle_epi8(t, _mm_and_si128(v, m));
  __m128i ch = _mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16(v, 4), m));
  _mm_store_si128(reinterpret_cast<__m128i*>(out.codes), _mm_unpacklo_epi8(cl, ch));
  _mm_store_si128(reinterpret_cast<__m128i*>(out.codes + 16), _mm_unpackhi_epi8(cl, ch));
#elif defined(MQ_SIMD_NEON)
  uint8x16_t v = vld1q_u8(p);
  uint8x16_t t = vld1q_u8(lut);
  uint8x16_t cl = vqtbl1q_u8(t, vandq_u8(v, vdupq_n_u8(0x0F)));
  uint8x16_t ch = vqtbl1q_u8(t, vshrq_n_u8(v, 4));
  vst1q_u8(out.codes, vzip1q_u8(cl, ch));
  vst1q_u8(out.codes + 16, vzip2q_u8(cl, ch));
#else
  for (int i = 0; i < 16; ++i) {
    out.codes[2 * i] = lut[p[i] & 0x0F];
    out.codes[2 * i + 1] = lut[p[i] >> 4];
  }
#endif
}

// Table of the 16 codes of a block with source scale s. Equal to
// mq_affine_code((u - 8) * s, p, n_bins) for every u: clamping before rounding gives
// the same integer as rounding before clamping (the bounds are integers), and for
// 0 <= x <= 255 adding and subtracting 1.5 * 2^23 rounds half to even like rint.
// The product, the subtraction and the true division are the oracle's, lane by lane.
inline void code_table(float s, mq_affine p, float n_bins, uint8_t* lut) {
  const float magic = 12582912.0f; // 1.5 * 2^23
#if defined(MQ_SIMD_SSSE3)
  const __m128 vs = _mm_set1_ps(s), vb = _mm_set1_ps(p.bias), vsc = _mm_set1_ps(p.scale);
  const __m128 zero = _mm_setzero_ps(), top = _mm_set1_ps(n_bins), vm = _mm_set1_ps(magic);
  __m128i q[4];
  for (int j = 0; j < 4; ++j) {
    const float u0 = static_cast<float>(4 * j - MQ_INT4_OFFSET);
    __m128 u = _mm_setr_ps(u0, u0 + 1.0f, u0 + 2.0f, u0 + 3.0f);
    __m128 v = _mm_div_ps(_mm_sub_ps(_mm_mul_ps(u, vs), vb), vsc);
    v = _mm_min_ps(_mm_max_ps(v, zero), top);
    v = _mm_sub_ps(_mm_add_ps(v, vm), vm);
    q[j] = _mm_cvttps_epi32(v);
  }
  __m128i w16a = _mm_packs_epi32(q[0], q[1]);
  __m128i w16b = _mm_packs_epi32(q[2], q[3]);
  _mm_store_si128(reinterpret_cast<__m128i*>(lut), _mm_packus_epi16(w16a, w16b));
#elif defined(MQ_SIMD_NEON)
  const float32x4_t vs = vdupq_n_f32(s), vb = vdupq_n_f32(p.bias), vsc = vdupq_n_f32(p.scale);
  const float32x4_t zero = vdupq_n_f32(0.0f), top = vdupq_n_f32(n_bins);
  const float32x4_t vm = vdupq_n_f32(magic);
  uint32x4_t q[4];
  for (int j = 0; j < 4; ++j) {
    const float u0 = static_cast<float>(4 * j - MQ_INT4_OFFSET);
    const float us[4] = {u0, u0 + 1.0f, u0 + 2.0f, u0 + 3.0f};
    float32x4_t v = vdivq_f32(vsubq_f32(vmulq_f32(vld1q_f32(us), vs), vb), vsc);
    v = vminq_f32(vmaxq_f32(v, zero), top);
    v = vsubq_f32(vaddq_f32(v, vm), vm);
    q[j] = vcvtq_u32_f32(v);
  }
  uint16x8_t a = vcombine_u16(vmovn_u32(q[0]), vmovn_u32(q[1]));
  uint16x8_t b = vcombine_u16(vmovn_u32(q[2]), vmovn_u32(q[3]));
  vst1q_u8(lut, vcombine_u8(vmovn_u16(a), vmovn_u16(b)));
#else
  for (int u = 0; u < 16; ++u) {
    float w = static_cast<float>(u - MQ_INT4_OFFSET) * s;
    float v = (w - p.bias) / p.scale;
    v = v < 0.0f ? 0.0f : v;
    v = v > n_bins ? n_bins : v;
    lut[u] = static_cast<uint8_t>(static_cast<int>((v + magic) - magic));
  }
#endif
}

#if defined(MQ_SIMD_SSSE3)
// 16 codes (bytes < 2^B) -> 2B bytes of bitstream in the low bytes of the result.
// Pairs and quads are merged by multiply-add (code0 + code1 * 2^B, then
// pair0 + pair1 * 2^2B), halves of each 64-bit lane joined by a shift, and the B
// bytes of each 64-bit lane gathered by a byte shuffle.
template <int B>
inline __m128i pack16(__m128i c) {
  __m128i pairs = _mm_maddubs_epi16(c, _mm_set1_epi16(static_cast<short>(1 | ((1 << B) << 8))));
  __m128i quads = _mm_madd_epi16(pairs, _mm_set1_epi32(1 | ((1 << (2 * B)) << 16)));
  const __m128i lo32 = _mm_set1_epi64x(0xFFFFFFFFll);
  __m128i x = _mm_or_si128(
      _mm_and_si128(quads, lo32), _mm_srli_epi64(_mm_andnot_si128(lo32, quads), 32 - 4 * B));
  alignas(16) int8_t idx[16];
  for (int i = 0; i < 16; ++i) {
    idx[i] = i < B ? i : (i < 2 * B ? 8 + i - B : -1);
  }
  return _mm_shuffle_epi8(x, _mm_load_si128(reinterpret_cast<const __m128i*>(idx)));
}
#endif

template <int BITS>
inline void store_block(const Block& b, uint8_t* dst) {
  // 32 codes -> 4 * BITS bytes of MLX's bitstream.
  if constexpr (BITS == 8) {
    std::memcpy(dst, b.codes, 32);
  } else {
#if defined(MQ_SIMD_SSSE3)
    alignas(16) uint8_t tmp[32];
    _mm_store_si128(
        reinterpret_cast<__m128i*>(tmp),
        pack16<BITS>(_mm_load_si128(reinterpret_cast<const __m128i*>(b.codes))));
    _mm_store_si128(
        reinterpret_cast<__m128i*>(tmp + 16),
        pack16<BITS>(_mm_load_si128(reinterpret_cast<const __m128i*>(b.codes + 16))));
    std::memcpy(dst, tmp, 2 * BITS);
    std::memcpy(dst + 2 * BITS, tmp + 16, 2 * BITS);
#else
    for (int j = 0; j < 4; ++j) {
      mq_u64 x;
      std::memcpy(&x, b.codes + 8 * j, 8);
      x = mq_pack8<BITS>(x);
      std::memcpy(dst + BITS * j, &x, BITS); // little-endian hosts only (x86, arm64)
    }
#endif
  }
}

// mq_affine_params for 4 groups at once. The scalar version is a chain of three
// dependent divisions per group; four chains in one vector let the divider overlap
// them. Lane by lane it is the same arithmetic (and comparison order) as the header.
inline void affine_params4(const float* wmin, const float* wmax, float n_bins, mq_affine* p) {
#if defined(MQ_SIMD_SSSE3)
  const __m128 sign = _mm_set1_ps(-0.0f);
  const __m128 lo = _mm_loadu_ps(wmin), hi = _mm_loadu_ps(wmax);
  __m128 neg = _mm_cmpgt_ps(_mm_andnot_ps(sign, lo), _mm_andnot_ps(sign, hi));
  __m128 s = _mm_div_ps(_mm_sub_ps(hi, lo), _mm_set1_ps(n_bins));
  s = _mm_max_ps(_mm_set1_ps(1e-7f), s); // eps > s ? eps : s, so NaN stays NaN
  s = _mm_xor_ps(s, _mm_andnot_ps(neg, sign));
  __m128 edge = _mm_or_ps(_mm_and_ps(neg, lo), _mm_andnot_ps(neg, hi));
  // rint: |x| + 2^23 - 2^23 rounds half to even below 2^23; larger values are integers.
  __m128 x = _mm_div_ps(edge, s);
  __m128 ax = _mm_andnot_ps(sign, x);
  const __m128 two23 = _mm_set1_ps(8388608.0f);
  __m128 r = _mm_or_ps(_mm_sub_ps(_mm_add_ps(ax, two23), two23), _mm_and_ps(sign, x));
  __m128 big = _mm_cmpge_ps(ax, two23); // also false for NaN, which then stays NaN in r
  __m128 q0 = _mm_or_ps(_mm_and_ps(big, x), _mm_andnot_ps(big, r));
  __m128 nz = _mm_cmpneq_ps(q0, _mm_setzero_ps());
  __m128 scale = _mm_or_ps(_mm_and_ps(nz, _mm_div_ps(edge, q0)), _mm_andnot_ps(nz, s));
  __m128 bias = _mm_and_ps(nz, edge);
  alignas(16) float sc[4], bi[4];
  _mm_store_ps(sc, scale);
  _mm_store_ps(bi, bias);
  for (int i = 0; i < 4; ++i) {
    p[i].scale = sc[i];
    p[i].bias = bi[i];
  }
#else
  for (int i = 0; i < 4; ++i) {
    p[i] = mq_affine_params(wmin[i], wmax[i], n_bins);
  }
#endif
}

template <int BITS, typename SrcT, typename OutT>
void requantize_rows(const RequantizeArgs& a, std::size_t r0, std::size_t r1) {
  const float n_bins = static_cast<float>((1 << BITS) - 1);
  const int K = a.K;
  const int blocks_per_group = a.group_size / 32;
  const int blocks_per_src = a.src_group_size / 32;
  const int n_groups = K / a.group_size;
  const int n_src = K / a.src_group_size;
  const std::size_t in_row = static_cast<std::size_t>(K) / 2;
  const std::size_t out_row = static_cast<std::size_t>(K) * BITS / 8;
  constexpr int GB = 4; // groups whose parameters are computed together

  alignas(16) uint8_t lut[16];
  Block blk;
  float s_blk[GB][4];
  for (std::size_t r = r0; r < r1; ++r) {
    const uint8_t* in = a.packed + r * in_row;
    const SrcT* ss = static_cast<const SrcT*>(a.src_scales) + r * n_src;
    uint8_t* out = a.wq + r * out_row;
    OutT* os = static_cast<OutT*>(a.scales) + r * n_groups;
    OutT* ob = static_cast<OutT*>(a.biases) + r * n_groups;
    for (int g0 = 0; g0 < n_groups; g0 += GB) {
      const int ng = n_groups - g0 < GB ? n_groups - g0 : GB;
      float wmin[GB] = {0.0f, 0.0f, 0.0f, 0.0f};
      float wmax[GB] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int gi = 0; gi < ng; ++gi) {
        const int b0 = (g0 + gi) * blocks_per_group;
        // Group range from the block nibble ranges; std::min/max comparison order,
        // so NaN scales are skipped as MLX's loop skips NaN weights.
        float mn = std::numeric_limits<float>::infinity();
        float mx_ = -mn;
        for (int j = 0; j < blocks_per_group; ++j) {
          int umin, umax;
          nibble_range(in + 16 * (b0 + j), umin, umax);
          float s = to_float(ss[(b0 + j) / blocks_per_src]);
          s_blk[gi][j] = s;
          float x = static_cast<float>(umin - MQ_INT4_OFFSET) * s;
          float y = static_cast<float>(umax - MQ_INT4_OFFSET) * s;
          float lo = y < x ? y : x;
          float hi = x < y ? y : x;
          mn = lo < mn ? lo : mn;
          mx_ = mx_ < hi ? hi : mx_;
        }
        wmin[gi] = mn;
        wmax[gi] = mx_;
      }
      mq_affine p[GB];
      affine_params4(wmin, wmax, n_bins, p);
      for (int gi = 0; gi < ng; ++gi) {
        const int g = g0 + gi;
        const int b0 = g * blocks_per_group;
        os[g] = static_cast<OutT>(p[gi].scale);
        ob[g] = static_cast<OutT>(p[gi].bias);
        for (int j = 0; j < blocks_per_group; ++j) {
          code_table(s_blk[gi][j], p[gi], n_bins, lut);
          lookup_codes(in + 16 * (b0 + j), lut, blk);
          store_block<BITS>(blk, out + 4 * BITS * (b0 + j));
        }
      }
    }
  }
}

template <typename SrcT, typename OutT>
void run_bits(const RequantizeArgs& a, std::size_t r0, std::size_t r1) {
  dispatch_bits(
      a.bits,
      [&](auto b) { requantize_rows<decltype(b)::value, SrcT, OutT>(a, r0, r1); },
      [] { throw std::invalid_argument("[requantize_int4] unsupported bits"); });
}

template <typename SrcT>
void dispatch_out(const RequantizeArgs& a, std::size_t r0, std::size_t r1) {
  switch (a.out_dtype) {
    case mx::float32:
      return run_bits<SrcT, float>(a, r0, r1);
    case mx::float16:
      return run_bits<SrcT, mx::float16_t>(a, r0, r1);
    case mx::bfloat16:
      return run_bits<SrcT, mx::bfloat16_t>(a, r0, r1);
    default:
      throw std::invalid_argument("[requantize_int4] unsupported output dtype");
  }
}

void dispatch(const RequantizeArgs& a, std::size_t r0, std::size_t r1) {
  switch (a.src_dtype) {
    case mx::float32:
      return dispatch_out<float>(a, r0, r1);
    case mx::float16:
      return dispatch_out<mx::float16_t>(a, r0, r1);
    case mx::bfloat16:
      return dispatch_out<mx::bfloat16_t>(a, r0, r1);
    default:
      throw std::invalid_argument("[requantize_int4] unsupported scales dtype");
  }
}

// ---- float weights (quantize_minmax)

// A group's weights as float32 (exact for every input dtype, as MLX's (float)w).
template <typename T>
inline void load_floats(const T* w, int n, float* out) {
  for (int i = 0; i < n; ++i) {
    out[i] = static_cast<float>(w[i]);
  }
}

#if defined(MQ_SIMD_SSSE3)
template <>
inline void load_floats<mx::bfloat16_t>(const mx::bfloat16_t* w, int n, float* out) {
  // bf16 -> float32 is the 16 bits shifted up.
  for (int i = 0; i < n; i += 8) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(out + i), _mm_unpacklo_epi16(_mm_setzero_si128(), v));
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(out + i + 4), _mm_unpackhi_epi16(_mm_setzero_si128(), v));
  }
}
#endif

// MLX's w_max = std::max(w_max, w), w_min = std::min(w_min, w) over the group: NaN
// weights are skipped. Lanes reduce in another order than MLX's loop, which can change
// only the sign of a zero extreme; that never changes the parameters (a zero maximum or
// minimum enters them only through w_max - w_min or as a zero edge).
inline void float_range(const float* x, int n, float& wmin, float& wmax) {
#if defined(MQ_SIMD_SSSE3)
  __m128 lo = _mm_set1_ps(std::numeric_limits<float>::infinity());
  __m128 hi = _mm_set1_ps(-std::numeric_limits<float>::infinity());
  for (int i = 0; i < n; i += 4) {
    __m128 v = _mm_loadu_ps(x + i);
    hi = _mm_max_ps(v, hi); // v > hi ? v : hi: a NaN v keeps hi
    lo = _mm_min_ps(v, lo);
  }
  alignas(16) float l[4], h[4];
  _mm_store_ps(l, lo);
  _mm_store_ps(h, hi);
  wmin = l[0];
  wmax = h[0];
  for (int i = 1; i < 4; ++i) {
    wmin = l[i] < wmin ? l[i] : wmin;
    wmax = wmax < h[i] ? h[i] : wmax;
  }
#else
  wmin = std::numeric_limits<float>::infinity();
  wmax = -wmin;
  for (int i = 0; i < n; ++i) {
    wmax = wmax < x[i] ? x[i] : wmax;
    wmin = x[i] < wmin ? x[i] : wmin;
  }
#endif
}

// The 32 codes of a block: clamp((w - bias) / scale, 0, n_bins), then rounded half to
// even (clamping first gives MLX's rint-then-clamp integer; see code_table). A NaN
// quotient becomes code 0, as MLX's float -> integer cast leaves it.
inline void float_codes(const float* x, mq_affine p, float n_bins, Block& out) {
  const float magic = 12582912.0f; // 1.5 * 2^23
#if defined(MQ_SIMD_SSSE3)
  const __m128 vb = _mm_set1_ps(p.bias), vsc = _mm_set1_ps(p.scale);
  const __m128 zero = _mm_setzero_ps(), top = _mm_set1_ps(n_bins), vm = _mm_set1_ps(magic);
  for (int h = 0; h < 2; ++h) {
    __m128i q[4];
    for (int j = 0; j < 4; ++j) {
      __m128 v = _mm_div_ps(_mm_sub_ps(_mm_loadu_ps(x + 16 * h + 4 * j), vb), vsc);
      v = _mm_min_ps(_mm_max_ps(v, zero), top); // max(NaN, 0) = 0
      v = _mm_sub_ps(_mm_add_ps(v, vm), vm);
      q[j] = _mm_cvttps_epi32(v);
    }
    __m128i a = _mm_packs_epi32(q[0], q[1]);
    __m128i b = _mm_packs_epi32(q[2], q[3]);
    _mm_store_si128(reinterpret_cast<__m128i*>(out.codes + 16 * h), _mm_packus_epi16(a, b));
  }
#else
  for (int i = 0; i < 32; ++i) {
    float v = (x[i] - p.bias) / p.scale;
    v = v > 0.0f ? v : 0.0f;
    v = v < n_bins ? v : n_bins;
    out.codes[i] = static_cast<uint8_t>(static_cast<int>((v + magic) - magic));
  }
#endif
}

template <int BITS, typename T>
void quantize_rows(const QuantizeArgs& a, std::size_t r0, std::size_t r1) {
  const float n_bins = static_cast<float>((1 << BITS) - 1);
  const int K = a.K;
  const int G = a.group_size;
  const int blocks_per_group = G / 32;
  const int n_groups = K / G;
  const std::size_t out_row = static_cast<std::size_t>(K) * BITS / 8;
  constexpr int GB = 4; // groups whose parameters are computed together
  alignas(16) float x[GB][128];
  Block blk;
  for (std::size_t r = r0; r < r1; ++r) {
    const T* w = static_cast<const T*>(a.w) + r * K;
    uint8_t* out = a.wq + r * out_row;
    T* os = static_cast<T*>(a.scales) + r * n_groups;
    T* ob = static_cast<T*>(a.biases) + r * n_groups;
    for (int g0 = 0; g0 < n_groups; g0 += GB) {
      const int ng = n_groups - g0 < GB ? n_groups - g0 : GB;
      float wmin[GB] = {0.0f, 0.0f, 0.0f, 0.0f};
      float wmax[GB] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int gi = 0; gi < ng; ++gi) {
        load_floats(w + static_cast<std::size_t>(g0 + gi) * G, G, x[gi]);
        float_range(x[gi], G, wmin[gi], wmax[gi]);
      }
      mq_affine p[GB];
      affine_params4(wmin, wmax, n_bins, p);
      for (int gi = 0; gi < ng; ++gi) {
        const int g = g0 + gi;
        os[g] = static_cast<T>(p[gi].scale);
        ob[g] = static_cast<T>(p[gi].bias);
        for (int j = 0; j < blocks_per_group; ++j) {
          float_codes(x[gi] + 32 * j, p[gi], n_bins, blk);
          store_block<BITS>(blk, out + 4 * BITS * (g * blocks_per_group + j));
        }
      }
    }
  }
}

template <typename T>
void quantize_dispatch(const QuantizeArgs& a, std::size_t r0, std::size_t r1) {
  dispatch_bits(
      a.bits,
      [&](auto b) { quantize_rows<decltype(b)::value, T>(a, r0, r1); },
      [] { throw std::invalid_argument("[quantize_minmax] unsupported bits"); });
}

} // namespace

bool requantize_simd_available() {
#if defined(MQ_SIMD_SSSE3)
  return __builtin_cpu_supports("ssse3");
#elif defined(MQ_SIMD_NEON)
  return true;
#else
  return false;
#endif
}

bool requantize_cpu_supported() {
#if defined(__x86_64__) && defined(__SSSE3__)
  return __builtin_cpu_supports("ssse3");
#else
  return true;
#endif
}

void requantize_int4(const RequantizeArgs& a) {
  // At least ~64 KB of input per claim, so that small tensors stay on one thread. Rows
  // are claimed from a shared counter: convert runs this next to its reader and writer
  // threads, and a static half per thread waited for the one whose core they share.
  std::size_t row_bytes = static_cast<std::size_t>(a.K) / 2;
  std::size_t min_rows = row_bytes >= 65536 ? 1 : 65536 / row_bytes;
  dynamic_for(a.rows, min_rows, [&](auto&& claim) {
    claim([&](std::size_t r0, std::size_t r1) { dispatch(a, r0, r1); });
  });
}

} // namespace moequant::cpu

namespace moequant::cpu {

void quantize_minmax(const QuantizeArgs& a) {
  const std::size_t row_bytes = static_cast<std::size_t>(a.K) * mx::size_of(a.w_dtype);
  const std::size_t min_rows = row_bytes >= 65536 ? 1 : 65536 / row_bytes;
  dynamic_for(a.rows, min_rows, [&](auto&& claim) {
    claim([&](std::size_t r0, std::size_t r1) {
      switch (a.w_dtype) {
        case mx::float32:
          return quantize_dispatch<float>(a, r0, r1);
        case mx::float16:
          return quantize_dispatch<mx::float16_t>(a, r0, r1);
        case mx::bfloat16:
          return quantize_dispatch<mx::bfloat16_t>(a, r0, r1);
        default:
          throw std::invalid_argument("[quantize_minmax] unsupported weight dtype");
      }
    });
  });
}

} // namespace moequant::cpu
