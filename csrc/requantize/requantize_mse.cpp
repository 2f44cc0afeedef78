#include "requantize/requantize_mse.h"

#include <limits>
#include <sstream>
#include <stdexcept>

#include "common/checks.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/utils.h"
#include "requantize/fit_cpu.h"
#include "requantize/requantize.h"
#include "requantize/requantize_cpu.h"

#include "requantize_fit_launch.h"

namespace moequant {

namespace {

mx::Shape with_last(const mx::Shape& s, int last) {
  mx::Shape r = s;
  r.back() = last;
  return r;
}

mx::array
importance_or_ones(const char* fn, std::optional<mx::array> h, int K, const mx::Stream& stream) {
  if (!h) {
    return mx::ones({K}, mx::float32, stream);
  }
  if (h->ndim() != 1 || h->shape(0) != K) {
    throw std::invalid_argument(
        std::string("[moequant.") + fn + "] importance must have shape (" + std::to_string(K) +
        ",), one weight per input channel; got " + shape_str(h->shape()) + ".");
  }
  return contiguous_as(mx::astype(*h, mx::float32, stream), h->shape(), stream);
}

std::tuple<mx::array, mx::array, mx::array> make_outputs(
    const mx::Shape& lead,
    int K,
    int bits,
    int group_size,
    mx::Dtype out_dtype,
    std::shared_ptr<RequantizeFit> prim,
    std::vector<mx::array> inputs) {
  auto outs = mx::array::make_arrays(
      {with_last(lead, K * bits / 32),
       with_last(lead, K / group_size),
       with_last(lead, K / group_size)},
      {mx::uint32, out_dtype, out_dtype},
      std::move(prim),
      std::move(inputs));
  return {outs[0], outs[1], outs[2]};
}

} // namespace

void check_quantize_args(
    const mx::array& w,
    int bits,
    int group_size,
    std::optional<mx::Dtype> dtype) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("[moequant.quantize] " + m); };
  check_bits_group("[moequant.quantize] ", bits, group_size);
  if (!is_float(w.dtype())) {
    fail("w must be float32, float16 or bfloat16; got " + dtype_str(w.dtype()) + ".");
  }
  if (dtype && !is_float(*dtype)) {
    fail("dtype must be float32, float16 or bfloat16; got " + dtype_str(*dtype) + ".");
  }
  if (w.ndim() < 2 || w.shape(-1) == 0 || w.shape(-1) % group_size != 0) {
    fail(
        "w must have at least 2 dimensions and a last axis divisible by group_size = " +
        std::to_string(group_size) + "; got shape " + shape_str(w.shape()) + ".");
  }
}

std::tuple<mx::array, mx::array, mx::array> requantize_int4_fit(
    const mx::array& packed,
    const mx::array& scales,
    std::optional<mx::array> importance,
    int bits,
    int group_size,
    int src_group_size,
    std::optional<mx::Dtype> dtype,
    mx::StreamOrDevice s) {
  check_requantize_int4_args(packed, scales, bits, group_size, src_group_size, dtype);
  check_metal_stream(s, "requantize_int4");
  auto stream = mx::to_stream(s);
  const int K = packed.shape(-1) * 8;
  auto h = importance_or_ones("requantize_int4", importance, K, stream);
  // Evaluated row-contiguous views (convert's pieces of its read buffers) are read in
  // place: contiguous_as, as the min-max path (requantize.cpp).
  auto p = contiguous_as(
      packed.dtype() == mx::uint32 ? packed : mx::view(packed, mx::uint32), packed.shape(), stream);
  auto sc = contiguous_as(scales, scales.shape(), stream);
  return make_outputs(
      packed.shape(),
      K,
      bits,
      group_size,
      dtype.value_or(scales.dtype()),
      std::make_shared<RequantizeFit>(stream, true, bits, group_size, src_group_size),
      {p, sc, h});
}

std::tuple<mx::array, mx::array, mx::array> quantize_fit(
    const mx::array& w,
    std::optional<mx::array> importance,
    int bits,
    int group_size,
    std::optional<mx::Dtype> dtype,
    mx::StreamOrDevice s) {
  check_quantize_args(w, bits, group_size, dtype);
  check_metal_stream(s, "quantize");
  auto stream = mx::to_stream(s);
  const int K = w.shape(-1);
  auto h = importance_or_ones("quantize", importance, K, stream);
  auto x = contiguous_as(w, w.shape(), stream);
  return make_outputs(
      w.shape(),
      K,
      bits,
      group_size,
      dtype.value_or(w.dtype()),
      std::make_shared<RequantizeFit>(stream, false, bits, group_size, 0),
      {x, h});
}

bool RequantizeFit::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const RequantizeFit&>(other);
  return int4_ == o.int4_ && bits_ == o.bits_ && group_size_ == o.group_size_ &&
      src_group_size_ == o.src_group_size_;
}

std::vector<mx::Shape> RequantizeFit::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& x = inputs[0];
  const int K = int4_ ? x.shape(-1) * 8 : x.shape(-1);
  return {
      with_last(x.shape(), K * bits_ / 32),
      with_last(x.shape(), K / group_size_),
      with_last(x.shape(), K / group_size_)};
}

void RequantizeFit::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  const auto& x = inputs[0];
  const auto& h = inputs.back();
  fit::FitArgs a;
  a.K = int4_ ? x.shape(-1) * 8 : x.shape(-1);
  a.rows = x.size() / x.shape(-1);
  a.bits = bits_;
  a.group_size = group_size_;
  a.src_group_size = int4_ ? src_group_size_ : 32;
  a.importance = h.data<float>();
  a.wq = outputs[0].data<uint8_t>();
  a.scales = outputs[1].data<void>();
  a.biases = outputs[2].data<void>();
  a.out_dtype = outputs[1].dtype();
  if (int4_) {
    a.packed = x.data<uint8_t>();
    a.src_scales = inputs[1].data<void>();
    a.src_dtype = inputs[1].dtype();
  } else {
    a.w = x.data<void>();
    a.src_dtype = x.dtype();
  }
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& i : inputs) {
    enc.set_input_array(i);
  }
  for (auto& o : outputs) {
    enc.set_output_array(o);
  }
  const bool int4 = int4_;
  // Inputs outlive the task (MLX holds them as the primitive's inputs).
  enc.dispatch([a, int4]() {
    if (int4) {
      fit::fit_int4(a);
    } else {
      fit::fit_float(a);
    }
  });
}

// ---- Metal: the host dispatch, written against KernelEncoder (common/kernel_encoder.h) so
// that the emulator tests execute it too; geometry and indices from requantize_fit_launch.h.

void RequantizeFit::encode(
    KernelEncoder& enc,
    const std::vector<mx::array>& inputs,
    const std::vector<mx::array>& outputs) const {
  const auto& x = inputs[0];
  const long long K = int4_ ? static_cast<long long>(x.shape(-1)) * 8 : x.shape(-1);
  const uint32_t groups_per_row = static_cast<uint32_t>(K / group_size_);
  const uint32_t n_groups =
      gpu_group_count("requantize_fit", x.size() / x.shape(-1), groups_per_row);
  if (n_groups == 0) {
    return;
  }
  const uint32_t bits = bits_, g = group_size_;
  const auto& src = int4_ ? inputs[1] : x;
  enc.set_kernel(
      launch::fit_kernel_name(int4_, dtype_str(src.dtype()), dtype_str(outputs[1].dtype())));
  if (int4_) {
    enc.set_input(inputs[0], MQ_FIT_PACKED);
    enc.set_input(inputs[1], MQ_FIT_SRC_SCALES);
    enc.set_input(inputs[2], MQ_FIT_INT4_IMPORTANCE);
  } else {
    enc.set_input(inputs[0], MQ_FIT_W);
    enc.set_input(inputs[1], MQ_FIT_FLOAT_IMPORTANCE);
  }
  enc.set_output(outputs[0], MQ_FIT_WQ);
  enc.set_output(outputs[1], MQ_FIT_SCALES);
  enc.set_output(outputs[2], MQ_FIT_BIASES);
  enc.set_scalar(n_groups, MQ_FIT_N_GROUPS);
  enc.set_scalar(groups_per_row, MQ_FIT_GROUPS_PER_ROW);
  enc.set_scalar(bits, MQ_FIT_BITS);
  enc.set_scalar(g, MQ_FIT_GROUP_SIZE);
  if (int4_) {
    enc.set_scalar(static_cast<uint32_t>(src_group_size_), MQ_FIT_SRC_GROUP_SIZE);
  }
  enc.dispatch_threadgroups(
      {(n_groups + MQ_FIT_THREADS - 1) / MQ_FIT_THREADS, 1, 1}, {MQ_FIT_THREADS, 1, 1});
}

void RequantizeFit::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  eval_metal(stream(), *this, outputs, inputs, "requantize_fit");
}

} // namespace moequant
