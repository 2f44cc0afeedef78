// Integer row kernels for 2/3/4-bit rows: AVX-512 F/BW/VBMI + VNNI + GFNI (this file
// is compiled with those flags; it is only called after a run-time CPU check).
//
// Why integers: converting codes to float costs three vector instructions per 16
// codes (isolate, convert, FMA), which caps one core below its share of the memory
// bandwidth. Here x is a block-fixed-point integer per affine group (moe_rows.h:
// X_i = round(x_i / sx_g) in 2 or 3 signed base-256 digits) and one vpdpbusd
// multiplies 64 one-byte codes by 64 digits and adds them into sixteen int32 lanes.
// The digit levels go Horner-style through one accumulator per row (all of a level's
// vpdpbusd, then shift left by 8 before the next level), which is exact: a lane sums
// at most 8 codes <= 15 (16 <= 3 for 2-bit) times |X| < 2^23 per block, below 2^30,
// and every partial value is bounded alike.
// Per block and row that is a few decode instructions, digits x registers
// vpdpbusd, digits - 1 shifts, one convert and one FMA with the group scales
// (s_w * sx), instead of three instructions per 16 codes.
#include <immintrin.h>

#include <type_traits>

#include "moe_swiglu/moe_rows.h"

namespace moequant::cpu {

namespace {

#include "moe_swiglu/moe_rows_avx512_v.inc"
#include "moe_swiglu/moe_rows_tail.inc"

// One block of packed codes to int_regs(B) registers of one-byte codes, in the byte
// order of int_code_of.
template <int B>
inline void decode(const uint8_t* p, __m512i* q, bool last) {
  if constexpr (B == 4) {
    const __m512i v = _mm512_loadu_si512(p);
    q[0] = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
    // A GF(2) affine map moves bits 4-7 of every byte to 0-3 and clears the rest: the
    // high nibble in one instruction (output bit i is row 7 - i of the matrix).
    q[1] = _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0);
  } else if constexpr (B == 2) {
    const __m512i v = _mm512_loadu_si512(p);
    q[0] = _mm512_and_si512(v, _mm512_set1_epi8(0x03));
    q[1] = _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x0408000000000000LL), 0);
    q[2] = _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020000000000000LL), 0);
    q[3] = _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x4080000000000000LL), 0);
  } else {
    // 48 bytes; a row's last block loads them masked, touching nothing past the row
    // (the masked load costs an extra vector uop). The block is 16 chunks of 8 codes
    // in 3 bytes; 64-bit word w gets the chunks of lanes 2w and 2w + 1 (moe_rows.h:
    // lane l takes chunk 4 * (l % 4) + l / 4); then each output byte takes the 8 bits
    // at its code's offset in its word.
    const __m512i v =
        last ? _mm512_maskz_loadu_epi8(0x0000FFFFFFFFFFFFull, p) : _mm512_loadu_si512(p);
    const __m512i spread = _mm512_permutexvar_epi8(
        _mm512_set_epi8(
            0,
            0,
            47,
            46,
            45,
            35,
            34,
            33,
            0,
            0,
            23,
            22,
            21,
            11,
            10,
            9,
            0,
            0,
            44,
            43,
            42,
            32,
            31,
            30,
            0,
            0,
            20,
            19,
            18,
            8,
            7,
            6,
            0,
            0,
            41,
            40,
            39,
            29,
            28,
            27,
            0,
            0,
            17,
            16,
            15,
            5,
            4,
            3,
            0,
            0,
            38,
            37,
            36,
            26,
            25,
            24,
            0,
            0,
            14,
            13,
            12,
            2,
            1,
            0),
        v);
    // Register 0: codes 0-3 of both chunks (bit offsets 0..9, 24..33); register 1:
    // codes 4-7 (12..21, 36..45).
    const __m512i c0 = _mm512_set1_epi64(0x211E1B1809060300LL);
    const __m512i c1 = _mm512_set1_epi64(0x2D2A272415120F0CLL);
    const __m512i m = _mm512_set1_epi8(0x07);
    q[0] = _mm512_and_si512(_mm512_multishift_epi64_epi8(c0, spread), m);
    q[1] = _mm512_and_si512(_mm512_multishift_epi64_epi8(c1, spread), m);
  }
}

// Prefetch distance within each row stream: enough to cover the memory latency at
// one core's share of the bandwidth, a few times over.
constexpr int kAhead = 2048;

// NR rows of the run, i, i + st, ..., i + (NR - 1) * st, sharing the digit loads;
// row i + j * st goes to out[j * st].
template <int B, SType ST, int ND, int NR>
__attribute__((always_inline)) inline void int_rows_body(
    const RowRun& r,
    int i,
    int st,
    const Prep& p,
    int cols,
    int G,
    float* out,
    float* sbuf) {
  constexpr int R = int_regs(B);
  constexpr int BLK = int_block_codes(B);
  constexpr int BB = BLK * B / 8;
  const int ng = r.ng;
  const int nblk = cols / BLK;
  const std::size_t ssz = ST == SType::f32 ? 4 : 2;
  const uint8_t* w[NR];
  const float* sf[NR];
  float bias_term[NR];
  // One thread cannot keep enough misses in flight on demand loads and the hardware
  // prefetchers alone, so each row's stream is prefetched into L2 kAhead bytes ahead
  // of its loads (in the block loop; with st > 1 a stream continues into row
  // i + j * st + 1, the one this stream computes next), and the next pass's scales
  // and biases now.
  for (int j = 0; j < NR; ++j) {
    const std::size_t sb = ng * ssz;
    const std::size_t row = static_cast<std::size_t>(i + j * st + (st > 1 ? 1 : NR));
    const uint8_t* s = static_cast<const uint8_t*>(r.s) + row * sb;
    const uint8_t* b = static_cast<const uint8_t*>(r.b) + row * sb;
    for (std::size_t o = 0; o < sb; o += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(s + o), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(b + o), _MM_HINT_T1);
    }
  }
  // Per group the float factor s_w * sx (padded so a block can load 16 of them) and
  // the bias term sum_g b_g * gsum_g, in one vector pass over the row's groups.
  // 3-bit blocks take their factors as one 4-float pattern per block (lane l of a
  // block is in group (l % 4) * gpb / 4, see int_code_of), so one broadcast load
  // gives a block's 16 lane factors: the pattern is the groups' factors in order,
  // each repeated 4 / gpb times. 2- and 4-bit blocks permute them from group order.
  constexpr bool pattern = B == 3;
  const int gpb = BLK / G;
  const int rep = pattern ? 4 / gpb : 1;
  const int stride = rep * ng + 16;
  for (int j = 0; j < NR; ++j) {
    const std::size_t row = static_cast<std::size_t>(i + j * st);
    w[j] = r.w + row * r.row_bytes;
    float* d = sbuf + j * stride;
    const uint8_t* s = static_cast<const uint8_t*>(r.s) + row * ng * ssz;
    const uint8_t* b = static_cast<const uint8_t*>(r.b) + row * ng * ssz;
    __m512 bacc = _mm512_setzero_ps();
    int g = 0;
    for (; g + 16 <= ng; g += 16) {
      const __m512 f = _mm512_mul_ps(V::load_s<ST>(s + g * ssz), _mm512_loadu_ps(p.sx + g));
      if (rep == 1) {
        _mm512_storeu_ps(d + g, f);
      } else {
        // Output vector k holds f[(16 k + m) / rep], m = 0..15.
        const __m512i m = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m128i sh = _mm_cvtsi32_si128(rep == 2 ? 1 : 2);
        for (int k = 0; k < rep; ++k) {
          const __m512i idx = _mm512_srl_epi32(_mm512_add_epi32(m, _mm512_set1_epi32(16 * k)), sh);
          _mm512_storeu_ps(d + rep * g + 16 * k, _mm512_permutexvar_ps(idx, f));
        }
      }
      bacc = _mm512_fmadd_ps(V::load_s<ST>(b + g * ssz), _mm512_loadu_ps(p.gsum + g), bacc);
    }
    float bt = _mm512_reduce_add_ps(bacc);
    for (; g < ng; ++g) {
      const float f = scale_at<ST>(s, g) * p.sx[g];
      for (int k = 0; k < rep; ++k) {
        d[rep * g + k] = f;
      }
      bt += scale_at<ST>(b, g) * p.gsum[g];
    }
    for (int z = 0; z < 16; ++z) {
      d[rep * ng + z] = 0.0f;
    }
    sf[j] = d;
    bias_term[j] = bt;
  }
  // Otherwise lane l of a block belongs to group blk * gpb + l * (BLK / 16) / G.
  alignas(64) int lg[16];
  for (int l = 0; l < 16; ++l) {
    lg[l] = l * (BLK / 16) / G;
  }
  const __m512i lane_group = _mm512_load_si512(lg);
  __m512 tot[NR];
  for (int j = 0; j < NR; ++j) {
    tot[j] = _mm512_setzero_ps();
  }
  // One block of the NR rows; the row's last block loads its codes masked.
  auto block = [&](int blk, bool last) __attribute__((always_inline)) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      // Every block (3-bit: 48 bytes, so one in four lands on a line already asked
      // for; cheaper than testing).
      _mm_prefetch(
          reinterpret_cast<const char*>(w[j] + static_cast<std::size_t>(blk) * BB + kAhead),
          _MM_HINT_T1);
    }
    __m512i q[NR][R];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      decode<B>(w[j] + static_cast<std::size_t>(blk) * BB, q[j], last);
    }
    const int8_t* xb = p.xd + static_cast<std::size_t>(blk) * ND * R * 64;
    // Horner through the digit levels in one accumulator per row: after each level
    // but the last, shift left by 8 (exact, see the bound above).
    __m512i acc[NR];
#pragma GCC unroll 4
    for (int dg = 0; dg < ND; ++dg) {
#pragma GCC unroll 4
      for (int rr = 0; rr < R; ++rr) {
        const __m512i xv = _mm512_loadu_si512(xb + (dg * R + rr) * 64);
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) {
          acc[j] =
              _mm512_dpbusd_epi32(dg + rr == 0 ? _mm512_setzero_si512() : acc[j], q[j][rr], xv);
        }
      }
      if (dg + 1 < ND) {
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) {
          acc[j] = _mm512_slli_epi32(acc[j], 8);
        }
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const __m512 sv = pattern ? _mm512_broadcast_f32x4(_mm_loadu_ps(sf[j] + 4 * blk))
          : gpb == 1 ? _mm512_set1_ps(sf[j][blk])
                     : _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(sf[j] + blk * gpb));
      tot[j] = _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(acc[j]), tot[j]);
    }
  };
  if (nblk > 0) {
    for (int blk = 0; blk + 1 < nblk; ++blk) {
      block(blk, false);
    }
    block(nblk - 1, true);
  }
  for (int j = 0; j < NR; ++j) {
    out[j * st] = p.sx_scale * _mm512_reduce_add_ps(tot[j]) + bias_term[j];
  }
  // A tail shorter than a block starts on a group boundary (G divides BLK); it is
  // computed in float from x.
  const int g_tail = (nblk * BLK) / G;
  if (g_tail < ng) {
    for (int j = 0; j < NR; ++j) {
      const void* s = static_cast<const uint8_t*>(r.s) + (i + j * st) * ng * ssz;
      out[j * st] += dot_groups_tail<B, ST>(w[j], s, p.x, g_tail, ng, G);
    }
  }
}

template <int B, SType ST, int ND>
void int_rows(const RowRun& r, int nrows, const Prep& p, int G, float* out, float* sbuf) {
  const int cols = r.ng * G;
  // Rows in fours (independent accumulators keep the vector units busy while loads
  // and decodes are in flight, and the digit loads are shared), then pairs, then one.
  // The fours are four streams: the first 4m rows of the run split into four
  // quarters and pass t takes row t of each, so each quarter is read front to back
  // and its prefetch runs ahead in one sequential stream (with four consecutive rows
  // per pass every row stream would skip three rows after each).
  const int m = nrows / 4;
  for (int t = 0; t < m; ++t) {
    int_rows_body<B, ST, ND, 4>(r, t, m, p, cols, G, out + t, sbuf);
  }
  int i = 4 * m;
  for (; i + 2 <= nrows; i += 2) {
    int_rows_body<B, ST, ND, 2>(r, i, 1, p, cols, G, out + i, sbuf);
  }
  if (i < nrows) {
    int_rows_body<B, ST, ND, 1>(r, i, 1, p, cols, G, out + i, sbuf);
  }
}

template <SType ST, int ND>
RowsFn pick_bits(int bits) {
  return dispatch_bits<BitList<2, 3, 4>>(
      bits,
      [](auto b) -> RowsFn { return &int_rows<decltype(b)::value, ST, ND>; },
      []() -> RowsFn { return nullptr; });
}

template <int ND>
RowsFn pick_stype(int bits, SType s) {
  switch (s) {
    case SType::f32:
      return pick_bits<SType::f32, ND>(bits);
    case SType::f16:
      return pick_bits<SType::f16, ND>(bits);
    default:
      return pick_bits<SType::bf16, ND>(bits);
  }
}

} // namespace

RowsFn rows_vnni(int bits, SType s, int digits) {
  return digits == 3 ? pick_stype<3>(bits, s) : pick_stype<2>(bits, s);
}

} // namespace moequant::cpu
