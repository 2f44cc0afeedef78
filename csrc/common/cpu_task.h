// The tail of every primitive's eval_cpu: MLX's CPU encoder holds the inputs and the
// outputs until the queued task has run on the primitive's stream, so the task may keep
// raw pointers into them.
#pragma once

#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace moequant {

template <typename F>
void enqueue_cpu(
    const mlx::core::Stream& stream,
    const std::vector<mlx::core::array>& inputs,
    std::vector<mlx::core::array> outputs, // handles: set_output_array takes array&
    F&& task) {
  auto& enc = mlx::core::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  for (auto& a : outputs) {
    enc.set_output_array(a);
  }
  enc.dispatch(std::forward<F>(task));
}

} // namespace moequant
