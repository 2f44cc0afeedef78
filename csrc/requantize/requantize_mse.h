// The mse fit ops: requantize_int4(fit="mse") and quantize(fit="mse").
#pragma once

#include <optional>
#include <tuple>

#include "mlx/ops.h"
#include "common/kernel_encoder.h"
#include "mlx/primitives.h"

namespace moequant {

namespace mx = mlx::core;

// INT4 (as requantize_int4) -> (wq, scales, biases) of the mse fit; importance is a
// float32 (K,) array or absent (all ones).
std::tuple<mx::array, mx::array, mx::array> requantize_int4_fit(
    const mx::array& packed,
    const mx::array& scales,
    std::optional<mx::array> importance,
    int bits,
    int group_size,
    int src_group_size,
    std::optional<mx::Dtype> dtype,
    mx::StreamOrDevice s = {});

// Float weights (..., K) -> (wq, scales, biases) of the mse fit, mx.quantize's layout.
std::tuple<mx::array, mx::array, mx::array> quantize_fit(
    const mx::array& w,
    std::optional<mx::array> importance,
    int bits,
    int group_size,
    std::optional<mx::Dtype> dtype,
    mx::StreamOrDevice s = {});

// The checks of quantize (both fits): std::invalid_argument naming the argument.
void check_quantize_args(
    const mx::array& w,
    int bits,
    int group_size,
    std::optional<mx::Dtype> dtype);

// Inputs: INT4 {packed uint32, scales, importance f32 (K)}; float {w, importance}.
class RequantizeFit : public mx::Primitive, public MetalDispatch {
 public:
  RequantizeFit(mx::Stream stream, bool int4, int bits, int group_size, int src_group_size)
      : mx::Primitive(stream),
        int4_(int4),
        bits_(bits),
        group_size_(group_size),
        src_group_size_(src_group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "RequantizeFit";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  // The Metal dispatch (requantize_mse.cpp), run by eval_gpu and by the emulator tests.
  void encode(
      KernelEncoder& enc,
      const std::vector<mx::array>& inputs,
      const std::vector<mx::array>& outputs) const override;

 private:
  bool int4_;
  int bits_;
  int group_size_;
  int src_group_size_;
};

} // namespace moequant
