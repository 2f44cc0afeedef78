// Row kernels shared by the moe_swiglu CPU phases: plain types only, so this header
// is safe to include from translation units compiled for different instruction sets.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/quant_formats.h"

namespace moequant::cpu {

// A vector prepared for one matrix layout: natural order, its sums per affine group,
// and what the SIMD kernels read instead of x (null where unused): the float SIMD
// kernels x in their lane order (xp); the integer kernels x as signed digits in their
// byte order (xd) with one scale per affine group, sx_g = sx_scale * sx[g] (sx_scale a
// power of two for the whole vector, so s_w * sx[g] stays far from underflow).
struct Prep {
  const float* x;
  const float* xp;
  const float* gsum;
  const int8_t* xd = nullptr;
  const int16_t* xw = nullptr; // the AVX2 integer kernels' x (16-bit words), or null
  const float* sx = nullptr;
  float sx_scale = 1.0f;
};

// A run of consecutive rows of one expert matrix.
struct RowRun {
  const uint8_t* w; // first row
  const void* s;
  const void* b;
  std::size_t row_bytes;
  int ng; // groups (= scales) per row
};

// Computes nrows consecutive rows into out; scratch holds row_scratch(cols) floats.
using RowsFn =
    void (*)(const RowRun&, int nrows, const Prep&, int group_size, float* out, float* scratch);

enum class SType { f32, f16, bf16 };

// Scratch floats a RowsFn needs for rows of cols codes (group size >= 32).
constexpr int row_scratch(int cols) {
  return 4 * (cols / 32 + 16);
}

// SIMD layouts (all bit widths but 5): a lane of 32 bits holds CPL consecutive codes
// in NB bytes; a block is LANES lanes.
constexpr int simd_nb(int bits) {
  return (bits == 3 || bits == 6) ? 3 : 4;
}
constexpr int simd_cpl(int bits) {
  return simd_nb(bits) * 8 / bits;
}

// Codes decoded by a float permute of a table of the code values (one instruction,
// reading only the low 4 bits of a lane with 16 lanes, 3 with 8) instead of AND and
// convert (two): code 0, and with 16 lanes every code of a 32-bit lane that starts
// on a byte boundary, brought to the bottom of its lane by loading the block at that
// byte offset. Their x is not pre-scaled.
constexpr bool simd_table_code(int bits, int lanes, int k) {
  if (bits > (lanes == 16 ? 4 : 3) || (bits * k) % 8 != 0) {
    return false;
  }
  return k == 0 || (lanes == 16 && simd_nb(bits) == 4);
}

// Integer layouts (2/3/4-bit rows, AVX-512 VNNI). x is a block-fixed-point integer
// per affine group, X_i = round(x_i / sx_g), written as 2 or 3 signed base-256
// digits (int_xmax), most significant first. A block of int_block_codes(bits) codes is decoded
// into int_regs(bits) registers of 64 one-byte codes: byte j of register r holds code
// int_code_of(bits, r, j) of the block, so the 4-byte lanes l of all registers together
// cover block codes / 16 codes of one group: for 2 and 4 bits codes
// [l * span, (l + 1) * span), span = block codes / 16; for 3 bits see below.
constexpr bool int_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4;
}
constexpr int int_regs(int bits) {
  return bits == 2 ? 4 : 2;
}
constexpr int int_block_codes(int bits) {
  return 64 * int_regs(bits);
}
constexpr int int_code_of(int bits, int r, int j) {
  if (bits == 4) {
    return 2 * j + r; // low and high nibble of byte j
  }
  if (bits == 2) {
    return 4 * j + r; // crumb r of byte j
  }
  // 3 bits: lane l takes the 8 codes of chunk 4 * (l % 4) + l / 4 (3 bytes each),
  // codes 0-3 in register 0 and 4-7 in register 1. So with group size G the lanes'
  // groups repeat every 4 lanes (l % 4 * 32 / G in the block), and a block's 16 lane
  // scales are one broadcast 4-float pattern.
  const int l = j / 4;
  return 8 * (4 * (l % 4) + l / 4) + 4 * r + j % 4;
}
// Largest |X|: three digits (float32 activations, 24 bits, the rounding of x relative
// to its group's largest |x| is 2^-24) or two (bf16/f16 activations, 16 bits).
constexpr int int_xmax(int digits) {
  return digits == 3 ? 127 * (1 + 256 + 65536) : 127 * (1 + 256);
}

// Integer word layouts (all bit widths but 5, AVX2). vpmaddwd multiplies 16-bit codes
// by 16-bit x words and adds pairs into int32 lanes; AVX2's byte multiply (vpmaddubsw)
// saturates with 8-bit codes and needs a widening multiply after it, and on AMD Zen
// both share the one vector multiply pipe, so words do more per multiply. x is a block
// fixed point per affine group as for VNNI (X = round(x / sx_g)), in w16_levels words:
// X itself (bf16/f16 activations, |X| <= 32767) or X >> L then X & (2^L - 1) (float32
// activations, L = w16_lo_bits: |X| < 2^23 or 2^30). A block of w16_block_bytes(bits) bytes is
// decoded into w16_regs(bits) registers of 16 codes; word w of register r holds code
// w16_code_of(bits, r, w), so int32 lane i (words 2i, 2i + 1 of every register) covers
// codes [i * span, (i + 1) * span) of the block, span = block codes / 8 (3 and 6 bits:
// span codes of the lane's 128-bit half, which lies in one group as G >= 32).
constexpr int w16_block_bytes(int bits) {
  return (bits == 3 || bits == 6) ? 24 : 32;
}
constexpr int w16_block_codes(int bits) {
  return w16_block_bytes(bits) * 8 / bits;
}
constexpr int w16_regs(int bits) {
  return w16_block_codes(bits) / 16;
}
constexpr int w16_code_of(int bits, int r, int w) {
  if (bits == 3 || bits == 6) {
    // A 128-bit half holds 4 chunks of 3 bytes (24 / bits codes each), spread into
    // words: lanes 0-1 take the words (b0, b1) of chunks 0-1 and 2-3 ("A" words: the
    // chunk's first 12 / bits codes at bit bits * k), lanes 2-3 the words (b1, b2) of the
    // same chunks ("B" words: the last 12 / bits codes at bit bits * k + 4). Register r
    // is (word >> bits * r) masked to code r of A words and, times 16, code
    // 12 / bits + r of B words (w16_lane_mul): one shift and one AND per register.
    const int cpc = 24 / bits;
    const int wi = w % 8;
    const int lane = wi / 2;
    const int chunk = 4 * (w / 8) + 2 * (lane % 2) + wi % 2;
    return chunk * cpc + (lane >= 2 ? cpc / 2 : 0) + r;
  }
  return (16 / bits) * w + r; // code r of the 16-bit word w of the packed block
}
// What the decoded codes of int32 lane i are multiplied by (3/6 bits: the B lanes 2, 3,
// 6, 7 hold codes times 16; undone on the float sums, exactly: a power of two).
constexpr int w16_lane_mul(int bits) {
  return (bits == 3 || bits == 6) ? 16 : 1;
}
// Whether the two levels of a block (split at 8 bits) can be joined in int32 lanes,
// (high << 8) + low = sum q X, before the convert: a lane sums span codes of up to
// 2^bits - 1 times |X| < 2^23, which must stay below 2^31 (not for 3, 6 and 8 bits:
// those convert each level on their own).
constexpr bool w16_join_levels(int bits) {
  return static_cast<long long>(w16_block_codes(bits) / 8) * ((1 << bits) - 1) *
      w16_lane_mul(bits) * ((1 << 23) + 255) <
      2147483647LL;
}
// Bits of the low of two levels: 8 where they are joined, else 15, so X keeps 31 bits
// (with 24 the fixed point's rounding, 2^-24 of the group's largest |x| per element,
// doubled the error of the 3/6-bit float kernels it replaced: the float32 tolerance).
constexpr int w16_lo_bits(int bits) {
  return w16_join_levels(bits) ? 8 : 15;
}
// Largest |X|: 32767 with one level; with two, X >> w16_lo_bits fits a word.
constexpr int w16_xmax(int levels, int bits) {
  return levels == 1 ? 32767 : (1 << (15 + w16_lo_bits(bits))) - 1;
}
// Where the word kernels beat the float ones on AMD Zen 1 (one level: every width they
// have; two: not 3 bits, whose words, each level converted on its own (w16_join_levels),
// ran 4 % slower than the float kernel; 6 and 8 bits 5-17 % faster, bench/RESULTS.md
// issue 15 session 8).
constexpr bool w16_bits(int bits, int levels) {
  return levels == 1 ? bits != 5 : (bits != 3 && bits != 5);
}

#if defined(__x86_64__) || defined(_M_X64)
// Defined in moe_rows_avx2.cpp / moe_rows_avx512.cpp (compiled for those ISAs).
RowsFn rows_avx2(int bits, SType s);
RowsFn rows_avx512(int bits, SType s);
// Defined in moe_rows_vnni.cpp; null for bits without an integer layout.
RowsFn rows_vnni(int bits, SType s, int digits);
// Defined in moe_rows_avx2int.cpp; null for bits without a word layout.
RowsFn rows_avx2int(int bits, SType s, int levels);
// X[i] = clamp(round_half_even(double(v[i]) * inv), -xmax, xmax) for i < n, the
// integer layouts' fixed point of one group (moe_swiglu_cpu.cpp, fixed_point), with
// AVX2 (every CPU with an integer layout has it); bit-identical to the scalar loop.
void round_scaled_avx2(const float* v, int n, double inv, int xmax, int32_t* X);
#endif

} // namespace moequant::cpu
