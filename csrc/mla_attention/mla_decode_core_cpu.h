// CPU work of mla_decode_core (see mla_attention.h), apart from mla_attention_cpu.h:
// that header goes into the AVX2 kernel file, this one brings qgemm's inline code.
#pragma once

#include <cstdint>

#include "qgemm/qgemm.h"

namespace moequant::cpu {

// Float32 rows the host prepared; the same kernels, in the same order, as the op-by-op
// chain (quantized_multi_linear, matmul_nt, softmax_rows, matmul_nt,
// quantized_multi_linear), so the result is bit-identical to it.
struct MlaCoreArgs {
  const float* q_nope = nullptr; // (B, H, dn)
  float* qk = nullptr; // (B, H, R + dr): q_pe in [R, R + dr); [0, R) gets embed_q's output
  const float* k = nullptr; // (B, S, R + dr): the latent, then k_pe
  qgemm::QuantWeight wq; // H matrices (R, dn)
  qgemm::QuantWeight wo; // H matrices (dv, R)
  int64_t B = 0, H = 0, S = 0, R = 0, DR = 0;
  float scale = 1.0f;
  float* y = nullptr; // (B, H, dv) float32
};

void mla_decode_core(const MlaCoreArgs& a);

} // namespace moequant::cpu
