// Driver of the mla_decode_attention CPU kernel: work split, threads, the ordered
// merge of the chunks' partial softmax states (see mla_attention_cpu.h).
#define MLA_NS mla_base
#include "mla_attention/mla_attention_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cpu_path.h"
#include "common/thread_pool.h"

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
