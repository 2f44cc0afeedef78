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

// Rows of x up to which the weight-streaming GEMV runs (the GEMM above).
constexpr int kGemvMaxRows = 4;

} // namespace moequant::cpu
