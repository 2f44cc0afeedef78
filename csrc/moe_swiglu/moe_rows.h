// Row kernels shared by the moe_swiglu CPU phases: plain types only, so this header
// is safe to include from translation units compiled for different instruction sets.
#pragma once

#include <cstddef>
#include <cstdint>

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
using RowsFn = void (*)(const RowRun&, int nrows, const Prep&, int group_size, float* out,
                        float* scratch);

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

#if defined(__x86_64__) || defined(_M_X64)
// Defined in moe_rows_avx2.cpp / moe_rows_avx512.cpp (compiled for those ISAs).
RowsFn rows_avx2(int bits, SType s);
RowsFn rows_avx512(int bits, SType s);
// Defined in moe_rows_vnni.cpp; null for bits without an integer layout.
RowsFn rows_vnni(int bits, SType s, int digits);
#endif

} // namespace moequant::cpu
