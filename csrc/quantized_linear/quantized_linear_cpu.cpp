// CPU driver of quantized_linear: for a few rows of x the row kernels of moe_swiglu
// (weight-streaming GEMV, each weight byte read once), for more the quantized GEMM
// (csrc/qgemm) threaded over (tile of W rows) x (range of x rows).
#include "quantized_linear/quantized_linear_cpu.h"

#include <algorithm>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "moe_swiglu/moe_swiglu_cpu.h"

namespace moequant::cpu {

namespace mx = mlx::core;

namespace {

// W rows per work item (a multiple of the GEMM's tile) and x rows per work item.
constexpr int64_t kTileN = 96;
constexpr int64_t kTileM = 256;
// Work items each thread should get at least: with fewer, one late or slowed thread
// leaves the other idle at the end (kv_a, N = 576, M = 64: 6 items of 96 rows for two
// threads ran at 36% of the FMA peak while larger layers ran at 60-80%).
constexpr int64_t kItemsPerThread = 6;

void linear_gemm(const LinearArgs& a, float* y) {
  const qgemm::Activations xa(a.x, a.xdtype, a.M, a.W.K, a.W.K);
  const int64_t N = a.W.N;
  const int64_t tm = (a.M + kTileM - 1) / kTileM;
  // Half tiles (still a multiple of the GEMM's) when whole ones are too few.
  const int64_t want = kItemsPerThread * get_num_threads();
  const int64_t tile_n = tm * ((N + kTileN - 1) / kTileN) < want ? kTileN / 2 : kTileN;
  const int64_t tn = (N + tile_n - 1) / tile_n;
  // Items run along N first: consecutive items share the rows of x they read.
  dynamic_for(static_cast<std::size_t>(tn * tm), 1, [&](auto&& claim) {
    claim([&](std::size_t i0, std::size_t i1) {
      for (std::size_t it = i0; it < i1; ++it) {
        const int64_t m0 = static_cast<int64_t>(it / tn) * kTileM;
        const int64_t n0 = static_cast<int64_t>(it % tn) * tile_n;
        const int64_t m1 = std::min(a.M, m0 + kTileM);
        const int64_t n1 = std::min(N, n0 + tile_n);
        qgemm::gemm(xa, a.W, n0, n1, y + m0 * N + n0, N, m0, m1);
      }
    });
  });
}

// The row kernels over x (batch, heads, M, K) into float32 y (batch, heads, M, N).
void linear_gemv(const LinearArgs& a, float* y, int64_t batch = 1, int64_t heads = 1) {
  // x in float once per call (bf16/f16 activations converted here only; float32 x is
  // read in place).
  const std::size_t K = a.W.K;
  const std::size_t vectors = static_cast<std::size_t>(batch * heads * a.M);
  std::vector<float> xf(a.xdtype == mx::float32 ? 0 : vectors * K);
  if (!xf.empty()) {
    load_floats(a.x, a.xdtype, xf.size(), xf.data());
  }
  const float* xp = xf.empty() ? static_cast<const float*>(a.x) : xf.data();
  QMat m;
  m.w = reinterpret_cast<const uint8_t*>(a.W.w);
  m.scales = a.W.scales;
  m.biases = a.W.biases;
  m.sdtype = a.W.sb_dtype;
  m.bits = a.W.bits;
  m.group_size = a.W.group_size;
  m.experts = static_cast<int>(heads);
  m.rows = static_cast<int>(a.W.N);
  m.cols = static_cast<int>(K);
  multi_rows(xp, static_cast<std::size_t>(batch), static_cast<std::size_t>(a.M), m, y, a.xdtype);
}

// y in float32 (x's dtype: a temporary, stored in x's dtype after).
template <typename F>
void with_float_out(const LinearArgs& a, std::size_t n, F&& body) {
  std::vector<float> tmp(a.xdtype == mx::float32 ? 0 : n);
  float* y = a.xdtype == mx::float32 ? static_cast<float*>(a.y) : tmp.data();
  body(y);
  if (a.xdtype != mx::float32) {
    store_floats(y, n, a.xdtype, a.y);
  }
}

} // namespace

void quantized_linear(const LinearArgs& a) {
  const std::size_t n = static_cast<std::size_t>(a.M) * a.W.N;
  if (n == 0) {
    return;
  }
  with_float_out(a, n, [&](float* y) {
    // 5-bit rows have no SIMD row kernel (their 8-code packs do not fit 32-bit lanes):
    // the GEMM's decode-and-multiply beats the portable rows ~3x even at one row.
    const bool simd_rows = a.W.bits != 5 || std::string(qgemm::gemm_path()) == "scalar";
    if (a.M <= kGemvMaxRows && simd_rows) {
      linear_gemv(a, y);
    } else {
      linear_gemm(a, y);
    }
  });
}

void quantized_multi_linear(const MultiLinearArgs& a) {
  const std::size_t n = static_cast<std::size_t>(a.batch * a.heads * a.rows.M) * a.rows.W.N;
  if (n == 0) {
    return;
  }
  with_float_out(a.rows, n, [&](float* y) {
    if (a.rows.W.K == 0) {
      std::fill(y, y + n, 0.0f); // an empty sum
      return;
    }
    linear_gemv(a.rows, y, a.batch, a.heads);
  });
}

} // namespace moequant::cpu
