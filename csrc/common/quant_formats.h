// The bit widths and group sizes of MLX's affine quantization that moequant's kernels
// run, the op builders' check of them, and dispatch_bits, which turns a run-time bit
// width into a template argument. python/moequant/quant_formats.py lists the same values
// (tests/test_quant_formats.py compares the two).
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

namespace moequant {

template <int... Bs>
struct BitList {
  static constexpr int values[] = {Bs...};
};

using AllBits = BitList<2, 3, 4, 5, 6, 8>;
// The MLA latent KV cache (mla_decode_attention).
using KvCacheBits = BitList<4, 8>;
inline constexpr int kGroupSizes[] = {32, 64, 128};

template <typename List = AllBits>
constexpr bool supported_bits(int bits) {
  for (int b : List::values) {
    if (b == bits) {
      return true;
    }
  }
  return false;
}

constexpr bool supported_group_size(int g) {
  for (int v : kGroupSizes) {
    if (v == g) {
      return true;
    }
  }
  return false;
}

// "2, 3, 4, 5, 6, 8" / "32, 64 or 128", for error messages.
template <typename List = AllBits>
inline std::string bits_list() {
  std::string s;
  for (int b : List::values) {
    s += (s.empty() ? "" : ", ") + std::to_string(b);
  }
  return s;
}

inline std::string group_sizes_list() {
  return "32, 64 or 128";
}

// The op builders' common preamble: `where` is the message prefix ("[moequant.op] " or
// "[moequant.op] gate_proj: ").
inline void check_group_size(const std::string& where, const char* name, int g) {
  if (!supported_group_size(g)) {
    throw std::invalid_argument(
        where + name + " must be " + group_sizes_list() + "; got " + std::to_string(g) + ".");
  }
}

inline void check_bits_group(const std::string& where, int bits, int group_size) {
  if (!supported_bits(bits)) {
    throw std::invalid_argument(
        where + "bits must be one of " + bits_list() + "; got " + std::to_string(bits) + ".");
  }
  check_group_size(where, "group_size", group_size);
}

// f(std::integral_constant<int, B>{}) for the B of List equal to `bits`, else otherwise().
// Returns what they return (f's result converted to otherwise()'s type). Replaces the
// switch ladders that instantiate a kernel template per bit width.
template <typename List = AllBits, typename F, typename D>
auto dispatch_bits(int bits, F&& f, D&& otherwise) -> decltype(otherwise()) {
  using R = decltype(otherwise());
  return [&]<int... Bs>(BitList<Bs...>) -> R {
    if constexpr (std::is_void_v<R>) {
      if (!((bits == Bs ? (f(std::integral_constant<int, Bs>{}), true) : false) || ...)) {
        otherwise();
      }
    } else {
      R r{};
      if (((bits == Bs ? (r = f(std::integral_constant<int, Bs>{}), true) : false) || ...)) {
        return r;
      }
      return otherwise();
    }
  }(List{});
}

} // namespace moequant
