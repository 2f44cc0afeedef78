// CPU kernel of quantized_linear, multi-threaded with moequant::parallel_for.
#pragma once

#include <cstdint>

#include "mlx/dtype.h"
#include "qgemm/qgemm.h"

namespace moequant::cpu {

struct LinearArgs {
  const void* x; // M x K, dtype xdtype (row-contiguous)
  mlx::core::Dtype xdtype = mlx::core::float32;
  int64_t M = 0;
  qgemm::QuantWeight W;
  void* y; // M x N, dtype xdtype
};

void quantized_linear(const LinearArgs& a);

// quantized_multi_linear: one matrix per head, W.w / W.scales / W.biases holding `heads`
// matrices of N x K back to back; x (batch, heads, M, K) -> y (batch, heads, M, N), both
// of dtype xdtype, y[b, h] = x[b, h] * dequant(W[h])^T. Row kernels at any M (its callers
// run decode steps), the portable ones for 5 bits.
struct MultiLinearArgs {
  LinearArgs rows; // M rows per (batch, head)
  int64_t batch = 1;
  int64_t heads = 1;
};

void quantized_multi_linear(const MultiLinearArgs& a);

// Rows of x up to which the weight-streaming GEMV runs (the GEMM above).
constexpr int kGemvMaxRows = 4;

} // namespace moequant::cpu
