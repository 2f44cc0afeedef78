// CPU kernel of mla_decode_attention: one decode step (one query token) of MLA's
// absorbed attention over an affine-quantized latent cache.
//
// For every batch row b and head h, with the query already in latent space
// (q_lat = embed_q(q_nope), R values) and its rope part q_pe (DR values):
//   s_t   = scale * (q_lat . latent_t + q_pe . k_pe_t)        t < T cached positions
//   out   = sum_t softmax(s)_t * latent_t                      (R values, latent space)
// latent_t and k_pe_t are dequantized from (codes, scales, biases) on the fly, in
// float32 (s * q + b), and every cached byte is read once per step: positions are
// split into chunks (threads), each chunk decodes a block of rows once and uses it
// for all its heads (scores, then the weighted sum), with an online softmax; the
// chunks' partial results are merged per head in chunk order. The chunking depends
// on T only, so the result does not depend on the thread count.
#pragma once

#include <cstdint>

namespace moequant::cpu {

enum class MlaDtype { f32, f16, bf16 };

struct MlaArgs {
  // Queries, float32 (converted by the driver): (B, H, R) and (B, H, DR).
  const float* q_lat = nullptr;
  const float* q_pe = nullptr;
  // Cache, row-contiguous (B, T, ...): codes as bytes (bits/8 per value), scales and
  // biases (B, T, R/gs) and (B, T, DR/gs) in sdtype.
  const uint8_t* lat_w = nullptr;
  const void* lat_s = nullptr;
  const void* lat_b = nullptr;
  const uint8_t* pe_w = nullptr;
  const void* pe_s = nullptr;
  const void* pe_b = nullptr;
  MlaDtype sdtype = MlaDtype::f32;
  int bits = 8;
  int group_size = 64;
  int B = 0, H = 0, T = 0, R = 0, DR = 0;
  float scale = 1.0f;
};

// Positions per block: rows decoded together and reused by every head of a work item.
constexpr int kMlaBlock = 16;

// Partial softmax state of positions [t0, t1) of batch row b for heads [h0, h1):
// m[h - h0] (running max of s), l[...] (sum of exp(s - m)), acc[(h - h0) * R + r]
// (sum of exp(s - m) * latent). scratch holds mla_scratch_floats(R, DR, h1 - h0).
using MlaChunkFn = void (*)(
    const MlaArgs&,
    int b,
    int t0,
    int t1,
    int h0,
    int h1,
    float* m,
    float* l,
    float* acc,
    float* scratch);

constexpr int64_t mla_scratch_floats(int R, int DR, int heads) {
  return int64_t(kMlaBlock) * (R + DR) + int64_t(heads) * kMlaBlock + R + DR;
}

// The whole op: out (B, H, R) float32.
void mla_decode_attention(const MlaArgs& a, float* out);

// Which kernel runs ("avx2" or "scalar"; MOEQUANT_CPU_PATH=scalar caps it).
const char* mla_cpu_path();

namespace mla_avx2 {
void chunk(const MlaArgs&, int, int, int, int, int, float*, float*, float*, float*);
}
namespace mla_base {
void chunk(const MlaArgs&, int, int, int, int, int, float*, float*, float*, float*);
}

} // namespace moequant::cpu
