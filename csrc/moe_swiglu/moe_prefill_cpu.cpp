// CPU kernel of moe_prefill: the MoE expert SwiGLU of moe_swiglu for many tokens.
//
// The (token, slot) pairs are counting-sorted by expert id (stable, so each expert's
// pairs stay in token order), and every selected expert runs as quantized GEMMs
// (qgemm) over its own tokens:
//   A. gate and up over the expert's gathered x rows, one work item per (expert, tile
//      of I rows); h = silu(g) * u per pair, in sorted order.
//   B. down over the expert's h rows, one work item per tile of D rows covering every
//      expert (the pairs' outputs in a per-thread buffer), then per token
//      y[t] = sum_j scores[t, j] * o[t, j] in slot order, as moe_down does.
// Each output element is computed by one fixed sequence of operations whatever thread
// runs it, so results do not depend on the thread count. Each selected expert's
// weights are read once per batch of tokens; a batch holds as many tokens as keep the
// per-pair buffers (x rows, h) near kPairBytes each, all of them in one call up to
// ~2k tokens of a 2048-wide model, ~600 of Kimi's 7168.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/thread_pool.h"
#include "moe_swiglu/moe_swiglu_cpu.h"
#include "qgemm/qgemm.h"

namespace moequant::cpu {

namespace mx = mlx::core;

namespace {

constexpr std::size_t kPairBytes = std::size_t(128) << 20;

// Rows of a projection per work item: a whole number of qgemm micro-tiles, enough
// items to balance two to a few dozen threads on a 1024-row projection.
constexpr int kTile = 16 * qgemm::detail::kNR;

// Expert e of a stacked projection as one qgemm matrix.
qgemm::QuantWeight expert_weight(const QMat& m, uint32_t e) {
  const std::size_t rows = static_cast<std::size_t>(e) * m.rows;
  const std::size_t row_bytes = static_cast<std::size_t>(m.cols) * m.bits / 8;
  const std::size_t sb_row =
      static_cast<std::size_t>(m.cols / m.group_size) * mx::size_of(m.sdtype);
  qgemm::QuantWeight W;
  W.w = reinterpret_cast<const uint32_t*>(m.w + rows * row_bytes);
  W.scales = static_cast<const uint8_t*>(m.scales) + rows * sb_row;
  W.biases = static_cast<const uint8_t*>(m.biases) + rows * sb_row;
  W.sb_dtype = m.sdtype;
  W.bits = m.bits;
  W.group_size = m.group_size;
  W.N = m.rows;
  W.K = m.cols;
  return W;
}

// The pairs of one expert: sorted positions [off, off + n).
struct Group {
  uint32_t e;
  std::size_t off;
  std::size_t n;
};

void run_batch(const PrefillArgs& a, std::size_t t0, std::size_t t1) {
  const int D = a.gate.cols;
  const int I = a.gate.rows;
  const int E = a.gate.experts;
  const std::size_t k = a.k;
  const std::size_t p0 = t0 * k;
  const std::size_t n = (t1 - t0) * k;
  const uint32_t* idx = a.idx + p0;

  // Counting sort of the pairs by expert: pos[p] is pair p's sorted position, tok[q]
  // the token (row of x) at sorted position q.
  std::vector<std::size_t> start(E + 1, 0);
  for (std::size_t p = 0; p < n; ++p) {
    ++start[idx[p] + 1];
  }
  for (int e = 0; e < E; ++e) {
    start[e + 1] += start[e];
  }
  std::vector<Group> groups;
  std::size_t maxn = 0;
  for (int e = 0; e < E; ++e) {
    if (start[e + 1] > start[e]) {
      groups.push_back({static_cast<uint32_t>(e), start[e], start[e + 1] - start[e]});
      maxn = std::max(maxn, start[e + 1] - start[e]);
    }
  }
  std::vector<std::size_t> pos(n);
  std::vector<int64_t> tok(n);
  for (std::size_t p = 0; p < n; ++p) {
    const std::size_t q = start[idx[p]]++;
    pos[p] = q;
    tok[q] = static_cast<int64_t>((p0 + p) / k);
  }
  const std::size_t G = groups.size();

  // A: h[q] = silu(gate x) * (up x) for every sorted pair q.
  std::vector<float> h(n * I);
  {
    std::vector<std::optional<qgemm::Activations>> ax(G);
    dynamic_for(G, 1, [&](auto&& claim) {
      claim([&](std::size_t g0, std::size_t g1) {
        for (std::size_t g = g0; g < g1; ++g) {
          ax[g].emplace(a.x, a.xdtype, groups[g].n, D, D, tok.data() + groups[g].off);
        }
      });
    });
    const std::size_t tiles = (I + kTile - 1) / kTile;
    dynamic_for(G * tiles, 1, [&](auto&& claim) {
      std::vector<float> gb(maxn * kTile), ub(maxn * kTile);
      claim([&](std::size_t i0, std::size_t i1) {
        for (std::size_t it = i0; it < i1; ++it) {
          const Group& gr = groups[it / tiles];
          const int r0 = static_cast<int>((it % tiles) * kTile);
          const int nr = std::min(kTile, I - r0);
          const auto& x = *ax[it / tiles];
          qgemm::gemm(x, expert_weight(a.gate, gr.e), r0, r0 + nr, gb.data(), nr);
          qgemm::gemm(x, expert_weight(a.up, gr.e), r0, r0 + nr, ub.data(), nr);
          for (std::size_t m = 0; m < gr.n; ++m) {
            float* hr = h.data() + (gr.off + m) * I + r0;
            for (int j = 0; j < nr; ++j) {
              hr[j] = silu(gb[m * nr + j]) * ub[m * nr + j];
            }
          }
        }
      });
    });
  }

  // B: o = down h per pair, tile by tile of D; y per token in slot order.
  std::vector<std::optional<qgemm::Activations>> ah(G);
  dynamic_for(G, 1, [&](auto&& claim) {
    claim([&](std::size_t g0, std::size_t g1) {
      for (std::size_t g = g0; g < g1; ++g) {
        ah[g].emplace(h.data() + groups[g].off * I, mx::float32, groups[g].n, I, I);
      }
    });
  });
  std::vector<float>().swap(h); // packed into ah
  const std::size_t tiles = (D + kTile - 1) / kTile;
  const std::size_t ysize = mx::size_of(a.xdtype);
  dynamic_for(tiles, 1, [&](auto&& claim) {
    std::vector<float> o(n * kTile), acc(kTile);
    claim([&](std::size_t i0, std::size_t i1) {
      for (std::size_t it = i0; it < i1; ++it) {
        const int d0 = static_cast<int>(it * kTile);
        const int nr = std::min(kTile, D - d0);
        for (std::size_t g = 0; g < G; ++g) {
          qgemm::gemm(
              *ah[g],
              expert_weight(a.down, groups[g].e),
              d0,
              d0 + nr,
              o.data() + groups[g].off * nr,
              nr);
        }
        for (std::size_t t = t0; t < t1; ++t) {
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (std::size_t j = 0; j < k; ++j) {
            const std::size_t p = (t - t0) * k + j;
            const float s = a.scores[p0 + p];
            const float* op = o.data() + pos[p] * nr;
            for (int r = 0; r < nr; ++r) {
              acc[r] += s * op[r];
            }
          }
          store_floats(acc.data(), nr, a.xdtype, static_cast<uint8_t*>(a.y) + (t * D + d0) * ysize);
        }
      }
    });
  });
}

} // namespace

void moe_prefill(const PrefillArgs& args) {
  if (args.T == 0) {
    return;
  }
  // Out-of-range ids: computed as expert 0, then their tokens' rows NaN (SafeIds).
  const SafeIds safe(args.idx, args.T, args.k, args.gate.experts);
  PrefillArgs a = args;
  a.idx = safe.ids();
  const std::size_t widest = std::max(a.gate.cols, a.gate.rows);
  const std::size_t batch = std::max<std::size_t>(1, kPairBytes / (sizeof(float) * a.k * widest));
  for (std::size_t t0 = 0; t0 < a.T; t0 += batch) {
    run_batch(a, t0, std::min(a.T, t0 + batch));
  }
  safe.nan_rows(a.gate.cols, a.xdtype, a.y);
}

} // namespace moequant::cpu
