// Row kernels shared by the moe_swiglu CPU phases: plain types only, so this header
// is safe to include from translation units compiled for different instruction sets.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moequant::cpu {

// A vector prepared for one matrix layout: natural order, SIMD order (null when the
// SIMD path is not used), and its sums per affine group.
struct Prep {
  const float* x;
  const float* xp;
  const float* gsum;
};

// A run of consecutive rows of one expert matrix.
struct RowRun {
  const uint8_t* w; // first row
  const void* s;
  const void* b;
  std::size_t row_bytes;
  int ng; // groups (= scales) per row
};

// Computes nrows consecutive rows into out; scratch holds 2 * (ng + 16) floats.
using RowsFn = void (*)(const RowRun&, int nrows, const Prep&, int group_size, float* out,
                        float* scratch);

enum class SType { f32, f16, bf16 };

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

#if defined(__x86_64__) || defined(_M_X64)
// Defined in moe_rows_avx2.cpp / moe_rows_avx512.cpp (compiled for those ISAs).
RowsFn rows_avx2(int bits, SType s);
RowsFn rows_avx512(int bits, SType s);
#endif

} // namespace moequant::cpu
