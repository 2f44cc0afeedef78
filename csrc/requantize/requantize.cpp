#include "requantize/requantize.h"

#include <limits>
#include <sstream>
#include <stdexcept>

#include "common/checks.h"
#include "common/cpu_task.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/utils.h"
#include "requantize/requantize_cpu.h"
#include "requantize/requantize_mse.h"
#include "requantize_launch.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.requantize_int4] " + msg);
}

mx::Shape out_shape(const mx::Shape& packed_shape, int last) {
  mx::Shape s = packed_shape;
  s.back() = last;
  return s;
}

} // namespace

void check_requantize_int4_args(
    const mx::array& packed,
    const mx::array& scales,
    int bits,
    int group_size,
    int src_group_size,
    std::optional<mx::Dtype> dtype) {
  // Every check happens here, when the graph is built, so that bad input never
  // reaches a kernel.
  check_bits_group("[moequant.requantize_int4] ", bits, group_size);
  check_group_size("[moequant.requantize_int4] ", "src_group_size", src_group_size);
  if (packed.dtype() != mx::int32 && packed.dtype() != mx::uint32) {
    fail(
        "packed must be int32 or uint32 (eight 4-bit codes per word); got " +
        dtype_str(packed.dtype()) + ".");
  }
  if (!is_float(scales.dtype())) {
    fail("scales must be float32, float16 or bfloat16; got " + dtype_str(scales.dtype()) + ".");
  }
  mx::Dtype out_dtype = dtype.value_or(scales.dtype());
  if (!is_float(out_dtype)) {
    fail("dtype must be float32, float16 or bfloat16; got " + dtype_str(out_dtype) + ".");
  }
  if (packed.ndim() < 2) {
    fail(
        "packed must have at least 2 dimensions (..., K/8), as mx.quantize requires; "
        "got shape " +
        shape_str(packed.shape()) + ".");
  }
  const long long K = static_cast<long long>(packed.shape(-1)) * 8;
  if (K == 0) {
    fail("packed has an empty last axis (shape " + shape_str(packed.shape()) + ").");
  }
  if (K % src_group_size != 0) {
    fail(
        "K = 8 * packed.shape[-1] = " + std::to_string(K) +
        " is not divisible by src_group_size = " + std::to_string(src_group_size) + ".");
  }
  if (K % group_size != 0) {
    fail(
        "K = 8 * packed.shape[-1] = " + std::to_string(K) +
        " is not divisible by group_size = " + std::to_string(group_size) + ".");
  }
  mx::Shape want_scales = out_shape(packed.shape(), static_cast<int>(K / src_group_size));
  if (scales.shape() != want_scales) {
    fail(
        "scales must have shape " + shape_str(want_scales) + " for packed of shape " +
        shape_str(packed.shape()) + " and src_group_size " + std::to_string(src_group_size) +
        "; got " + shape_str(scales.shape()) + ".");
  }
  // The kernels and output_shapes hold K in an int.
  if (K > std::numeric_limits<int>::max()) {
    fail("rows of " + std::to_string(K) + " weights are too long (at most 2^31 - 1).");
  }
}

std::tuple<mx::array, mx::array, mx::array> requantize_int4(
    const mx::array& packed,
    const mx::array& scales,
    int bits,
    int group_size,
    int src_group_size,
    std::optional<mx::Dtype> dtype,
    mx::StreamOrDevice s) {
  check_requantize_int4_args(packed, scales, bits, group_size, src_group_size, dtype);
  mx::Dtype out_dtype = dtype.value_or(scales.dtype());
  const long long K = static_cast<long long>(packed.shape(-1)) * 8;
  check_metal_stream(s, "requantize_int4");
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::cpu && !cpu::requantize_cpu_supported()) {
    throw std::runtime_error(
        "[moequant.requantize_int4] this x86-64 build needs a CPU with SSSE3.");
  }
  // Row-contiguous inputs let the kernels use flat indexing. contiguous_as passes an
  // evaluated row-contiguous view through: mx::contiguous copies any view into a larger
  // buffer (convert's pieces are views into its read buffers: a copy and fresh pages of
  // the whole piece per call).
  auto p = contiguous_as(
      packed.dtype() == mx::uint32 ? packed : mx::view(packed, mx::uint32), packed.shape(), stream);
  auto sc = contiguous_as(scales, scales.shape(), stream);

  auto outs = mx::array::make_arrays(
      {out_shape(packed.shape(), static_cast<int>(K * bits / 32)),
       out_shape(packed.shape(), static_cast<int>(K / group_size)),
       out_shape(packed.shape(), static_cast<int>(K / group_size))},
      {mx::uint32, out_dtype, out_dtype},
      std::make_shared<RequantizeInt4>(stream, bits, group_size, src_group_size),
      {p, sc});
  return {outs[0], outs[1], outs[2]};
}

std::tuple<mx::array, mx::array, mx::array>
quantize_minmax(const mx::array& w, int bits, int group_size, mx::StreamOrDevice s) {
  check_quantize_args(w, bits, group_size, std::nullopt);
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument("[moequant.quantize_minmax] CPU streams only (use mx.quantize).");
  }
  const int K = w.shape(-1);
  auto outs = mx::array::make_arrays(
      {out_shape(w.shape(), K / 32 * bits),
       out_shape(w.shape(), K / group_size),
       out_shape(w.shape(), K / group_size)},
      {mx::uint32, w.dtype(), w.dtype()},
      std::make_shared<QuantizeMinmax>(stream, bits, group_size),
      {contiguous_as(w, w.shape(), stream)});
  return {outs[0], outs[1], outs[2]};
}

bool QuantizeMinmax::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizeMinmax&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> QuantizeMinmax::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& w = inputs[0];
  const int K = w.shape(-1);
  return {
      out_shape(w.shape(), K / 32 * bits_),
      out_shape(w.shape(), K / group_size_),
      out_shape(w.shape(), K / group_size_)};
}

void QuantizeMinmax::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& w = inputs[0];
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  cpu::QuantizeArgs args;
  args.w = w.data<void>();
  args.wq = outputs[0].data<uint8_t>();
  args.scales = outputs[1].data<void>();
  args.biases = outputs[2].data<void>();
  args.K = w.shape(-1);
  args.rows = w.size() / w.shape(-1);
  args.bits = bits_;
  args.group_size = group_size_;
  args.w_dtype = w.dtype();
  enqueue_cpu(stream(), {w}, outputs, [args]() { cpu::quantize_minmax(args); });
}

bool RequantizeInt4::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const RequantizeInt4&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_ && src_group_size_ == o.src_group_size_;
}

std::vector<mx::Shape> RequantizeInt4::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& packed = inputs[0];
  int K = packed.shape(-1) * 8;
  return {
      out_shape(packed.shape(), K * bits_ / 32),
      out_shape(packed.shape(), K / group_size_),
      out_shape(packed.shape(), K / group_size_)};
}

void RequantizeInt4::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& packed = inputs[0];
  const auto& scales = inputs[1];
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  cpu::RequantizeArgs args;
  args.packed = packed.data<uint8_t>();
  args.src_scales = scales.data<void>();
  args.wq = outputs[0].data<uint8_t>();
  args.scales = outputs[1].data<void>();
  args.biases = outputs[2].data<void>();
  args.K = packed.shape(-1) * 8;
  args.rows = packed.size() / packed.shape(-1);
  args.bits = bits_;
  args.group_size = group_size_;
  args.src_group_size = src_group_size_;
  args.src_dtype = scales.dtype();
  args.out_dtype = outputs[1].dtype();

  enqueue_cpu(stream(), {packed, scales}, outputs, [args]() { cpu::requantize_int4(args); });
}

// ---- Metal: the host dispatch, written against KernelEncoder (common/kernel_encoder.h) so
// that the emulator tests execute it too; geometry and indices from requantize_launch.h.

void RequantizeInt4::encode(
    KernelEncoder& enc,
    const std::vector<mx::array>& inputs,
    const std::vector<mx::array>& outputs) const {
  const auto& packed = inputs[0];
  const auto& scales = inputs[1];
  const long long K = static_cast<long long>(packed.shape(-1)) * 8;
  const uint32_t groups_per_row = static_cast<uint32_t>(K / group_size_);
  const uint32_t n_groups =
      gpu_group_count("requantize_int4", packed.size() / packed.shape(-1), groups_per_row);
  if (n_groups == 0) {
    return;
  }
  enc.set_kernel(
      launch::requantize_int4_name(
          bits_,
          group_size_,
          src_group_size_,
          dtype_str(scales.dtype()),
          dtype_str(outputs[1].dtype())));
  enc.set_input(packed, MQ_RQ_PACKED);
  enc.set_input(scales, MQ_RQ_SRC_SCALES);
  enc.set_output(outputs[0], MQ_RQ_WQ);
  enc.set_output(outputs[1], MQ_RQ_SCALES);
  enc.set_output(outputs[2], MQ_RQ_BIASES);
  enc.set_scalar(n_groups, MQ_RQ_N_GROUPS);
  enc.set_scalar(groups_per_row, MQ_RQ_GROUPS_PER_ROW);
  enc.dispatch_threadgroups(
      {(n_groups + MQ_RQ_THREADS - 1) / MQ_RQ_THREADS, 1, 1}, {MQ_RQ_THREADS, 1, 1});
}

void RequantizeInt4::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  eval_metal(stream(), *this, outputs, inputs, "requantize_int4");
}

} // namespace moequant
