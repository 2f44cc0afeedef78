// Driver of the mla_decode_attention CPU kernel: work split, threads, the ordered
// merge of the chunks' partial softmax states (see mla_attention_cpu.h); and
// mla_decode_core's CPU chain (mla_decode_core_cpu.h).
#define MLA_NS mla_base
#include "mla_attention/mla_attention_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/cpu_path.h"
#include "common/thread_pool.h"
#include "dense_gemm/dense_gemm.h"
#include "mla_attention/mla_decode_core_cpu.h"
#include "quantized_linear/quantized_linear_cpu.h"
#include "softmax_rows/softmax_rows.h"

namespace moequant::cpu {

namespace {

// Positions per chunk: a function of T alone (at least 256 positions, at most 32
// chunks), so the merge order, and with it the result, is the same on any number of
// threads.
constexpr int kMinChunk = 256;
constexpr int kMaxChunks = 32;

int chunk_len(int T) {
  int len = std::max(kMinChunk, (T + kMaxChunks - 1) / kMaxChunks);
  return (len + kMlaBlock - 1) / kMlaBlock * kMlaBlock;
}

} // namespace

const char* mla_cpu_path() {
  return avx2_kernels_enabled() ? "avx2" : "scalar";
}

void mla_decode_attention(const MlaArgs& a, float* out) {
#if defined(__x86_64__) || defined(_M_X64)
  const MlaChunkFn fn = avx2_kernels_enabled() ? &mla_avx2::chunk : &mla_base::chunk;
#else
  const MlaChunkFn fn = &mla_base::chunk;
#endif
  const int len = chunk_len(a.T);
  const int nc = (a.T + len - 1) / len;
  // Heads are independent, so splitting them changes no arithmetic: with few chunks
  // (short caches) the threads split the heads too (each head group then decodes the
  // chunk's rows again; the rows are few).
  const int threads = get_num_threads();
  const int hg = std::min(a.H, std::max(1, (threads + nc * a.B - 1) / (nc * a.B)));
  const int hper = (a.H + hg - 1) / hg;
  const int64_t R = a.R;
  // Partial states: [b][chunk][h] of (m, l) and acc (R).
  std::vector<float> pm(size_t(a.B) * nc * a.H), pl(pm.size()), pacc(pm.size() * R);
  const size_t items = size_t(a.B) * nc * hg;
  parallel_for(items, 1, [&](size_t i0, size_t i1) {
    std::vector<float> scratch(mla_scratch_floats(a.R, a.DR, hper));
    for (size_t i = i0; i < i1; ++i) {
      const int g = int(i % hg), c = int(i / hg % nc), b = int(i / hg / nc);
      const int h0 = g * hper, h1 = std::min(a.H, h0 + hper);
      if (h0 >= h1) {
        continue;
      }
      const size_t at = (size_t(b) * nc + c) * a.H + h0;
      fn(a,
         b,
         c * len,
         std::min(a.T, (c + 1) * len),
         h0,
         h1,
         &pm[at],
         &pl[at],
         &pacc[at * R],
         scratch.data());
    }
  });
  // Merge in chunk order: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
  parallel_for(size_t(a.B) * a.H, 1, [&](size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) {
      const size_t b = i / a.H, h = i % a.H;
      float M = -INFINITY;
      for (int c = 0; c < nc; ++c) {
        M = std::max(M, pm[(b * nc + c) * a.H + h]);
      }
      float* o = out + i * R;
      std::fill(o, o + R, 0.0f);
      float L = 0.0f;
      for (int c = 0; c < nc; ++c) {
        const size_t at = (b * nc + c) * a.H + h;
        // A NaN max (NaN scores) gives NaN weights: the output is NaN, not silently 0.
        const float w = std::isnan(pm[at]) || std::isnan(M) ? NAN : std::exp(pm[at] - M);
        L += w * pl[at];
        const float* ac = &pacc[at * R];
        for (int64_t r = 0; r < R; ++r) {
          o[r] += w * ac[r];
        }
      }
      const float inv = 1.0f / L;
      for (int64_t r = 0; r < R; ++r) {
        o[r] *= inv;
      }
    }
  });
}

} // namespace moequant::cpu

// ---- mla_decode_core (mla_decode_core_cpu.h)

namespace moequant::cpu {

void mla_decode_core(const MlaCoreArgs& a) {
  const int64_t BH = a.B * a.H, R = a.R, RD = a.R + a.DR, S = a.S;
  // embed_q: (B, H, 1, dn) -> (B, H, 1, R), as quantized_multi_linear with float32 x.
  std::vector<float> qlat(static_cast<std::size_t>(BH * R));
  MultiLinearArgs e;
  e.batch = a.B;
  e.heads = a.H;
  e.rows.x = a.q_nope;
  e.rows.M = 1;
  e.rows.W = a.wq;
  e.rows.y = qlat.data();
  quantized_multi_linear(e);
  for (int64_t i = 0; i < BH; ++i) {
    std::memcpy(a.qk + i * RD, qlat.data() + i * R, sizeof(float) * R);
  }
  // Scores: every head against the one latent head, (B, H, R + dr) x (B, S, R + dr)^T.
  std::vector<float> s(static_cast<std::size_t>(BH * S));
  matmul_nt(a.qk, a.k, s.data(), a.B, a.H, S, RD);
  softmax_rows(s.data(), s.data(), BH, S, a.scale);
  // The value product reads the latent transposed, (B, R, S), as the chain's matmul_nt
  // copies its swapaxes view; in tiles (a column at a time strides S floats, which at
  // S = 512 maps every store to a few cache sets: slower than the whole chain).
  constexpr int64_t kTile = 16;
  std::vector<float> vt(static_cast<std::size_t>(a.B * R * S));
  for (int64_t b = 0; b < a.B; ++b) {
    const float* src = a.k + b * S * RD;
    float* dst = vt.data() + b * R * S;
    for (int64_t r0 = 0; r0 < R; r0 += kTile) {
      for (int64_t t0 = 0; t0 < S; t0 += kTile) {
        const int64_t r1 = std::min(R, r0 + kTile), t1 = std::min(S, t0 + kTile);
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t t = t0; t < t1; ++t) {
            dst[r * S + t] = src[t * RD + r];
          }
        }
      }
    }
  }
  std::vector<float> o(static_cast<std::size_t>(BH * R));
  matmul_nt(s.data(), vt.data(), o.data(), a.B, a.H, R, S);
  // unembed_out: (B, H, 1, R) -> (B, H, 1, dv).
  MultiLinearArgs u;
  u.batch = a.B;
  u.heads = a.H;
  u.rows.x = o.data();
  u.rows.M = 1;
  u.rows.W = a.wo;
  u.rows.y = a.y;
  quantized_multi_linear(u);
}

} // namespace moequant::cpu
