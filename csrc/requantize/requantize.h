// requantize_int4: compressed-tensors INT4 (symmetric, offset-8 nibbles) -> MLX affine.
#pragma once

#include <optional>
#include <stdexcept>
#include <tuple>

#include "common/kernel_encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// Returns (wq, scales, biases) laid out exactly as mx.quantize lays them out.
std::tuple<mx::array, mx::array, mx::array> requantize_int4(
    const mx::array& packed,
    const mx::array& scales,
    int bits,
    int group_size,
    int src_group_size,
    std::optional<mx::Dtype> dtype,
    mx::StreamOrDevice s = {});

// The argument checks of requantize_int4 (std::invalid_argument naming the argument);
// shared with requantize_int4_fit.
void check_requantize_int4_args(
    const mx::array& packed,
    const mx::array& scales,
    int bits,
    int group_size,
    int src_group_size,
    std::optional<mx::Dtype> dtype);

// mx.quantize(w, group_size, bits) (affine, min-max), bit for bit, on a CPU stream: the
// same (wq uint32, scales, biases in w's dtype), computed on every core (MLX's CPU
// kernel is one scalar thread).
std::tuple<mx::array, mx::array, mx::array>
quantize_minmax(const mx::array& w, int bits, int group_size, mx::StreamOrDevice s = {});

class QuantizeMinmax : public mx::Primitive {
 public:
  QuantizeMinmax(mx::Stream stream, int bits, int group_size)
      : mx::Primitive(stream), bits_(bits), group_size_(group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[moequant.quantize_minmax] CPU streams only (use mx.quantize).");
  }
  const char* name() const override {
    return "QuantizeMinmax";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int bits_;
  int group_size_;
};

class RequantizeInt4 : public mx::Primitive, public MetalDispatch {
 public:
  RequantizeInt4(mx::Stream stream, int bits, int group_size, int src_group_size)
      : mx::Primitive(stream),
        bits_(bits),
        group_size_(group_size),
        src_group_size_(src_group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "RequantizeInt4";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  // The Metal dispatch (requantize.cpp), run by eval_gpu and by the emulator tests.
  void encode(
      KernelEncoder& enc,
      const std::vector<mx::array>& inputs,
      const std::vector<mx::array>& outputs) const override;

 private:
  int bits_;
  int group_size_;
  int src_group_size_;
};

} // namespace moequant
