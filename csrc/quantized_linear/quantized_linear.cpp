#include "quantized_linear/quantized_linear.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/strided.h"
#include "mlx/backend/cpu/encoder.h"
#include "quantized_linear/quantized_linear_cpu.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.quantized_linear] " + msg);
}

} // namespace

void check_quantized_matmul_args(
    const char* op,
    const char* w_form,
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int lead_dims,
    int bits,
    int group_size) {
  auto fail = [op](const std::string& msg) { throw std::invalid_argument(op + msg); };
  check_bits_group(op, bits, group_size);
  if (!is_float(x.dtype())) {
    fail("x must be float32, float16 or bfloat16; got " + dtype_str(x.dtype()) + ".");
  }
  if (w.dtype() != mx::uint32) {
    fail("w must be uint32 (packed codes); got " + dtype_str(w.dtype()) + ".");
  }
  if (static_cast<int>(w.ndim()) != lead_dims + 2) {
    fail(std::string("w must have shape ") + w_form + "; got " + shape_str(w.shape()) + ".");
  }
  if (!is_float(scales.dtype())) {
    fail("scales must be float32, float16 or bfloat16; got " + dtype_str(scales.dtype()) + ".");
  }
  if (biases.dtype() != scales.dtype()) {
    fail(
        "biases must have the dtype of scales (" + dtype_str(scales.dtype()) + "); got " +
        dtype_str(biases.dtype()) + ".");
  }
  const int K = x.shape(-1);
  if (K % group_size != 0) {
    fail(
        "x's last dimension " + std::to_string(K) + " is not divisible by group_size " +
        std::to_string(group_size) + ".");
  }
  mx::Shape want_w(w.shape().begin(), w.shape().begin() + lead_dims);
  want_w.push_back(w.shape(lead_dims));
  mx::Shape want_s = want_w;
  want_w.push_back(K / 32 * bits);
  want_s.push_back(K / group_size);
  if (w.shape() != want_w) {
    fail(
        "w must have shape " + shape_str(want_w) + " for x (..., " + std::to_string(K) + ") at " +
        std::to_string(bits) + " bits; got " + shape_str(w.shape()) + ".");
  }
  if (scales.shape() != want_s) {
    fail(
        "scales must have shape " + shape_str(want_s) + "; got " + shape_str(scales.shape()) + ".");
  }
  if (biases.shape() != want_s) {
    fail(
        "biases must have shape " + shape_str(want_s) + "; got " + shape_str(biases.shape()) + ".");
  }
}

mx::array quantized_linear(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  if (x.ndim() < 1) {
    fail("x must have shape (..., K); got a scalar.");
  }
  check_quantized_matmul_args(
      "[moequant.quantized_linear] ", "(N, K*bits/32)", x, w, scales, biases, 0, bits, group_size);
  const int N = w.shape(0);
  auto st = mx::to_stream(s);
  mx::Shape out_shape = x.shape();
  out_shape.back() = N;
  if (st.device == mx::Device::gpu) {
    // MLX's Metal kernels already do these shapes well.
    return mx::astype(
        mx::quantized_matmul(x, w, scales, biases, true, group_size, bits, "affine", st),
        x.dtype(),
        st);
  }
  // x goes in as it is, of any rank and strides (no Reshape / Contiguous nodes around
  // the call, ~8 us each at decode): the primitive reads it as (M, K) rows and copies a
  // strided view at eval time. The weights are evaluated and row-contiguous (contiguous_as
  // passes them as they are).
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), st); };
  return mx::array(
      out_shape,
      x.dtype(),
      std::make_shared<QuantizedLinear>(st, bits, group_size),
      {x, c(w), c(scales), c(biases)});
}

bool QuantizedLinear::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedLinear&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> QuantizedLinear::output_shapes(const std::vector<mx::array>& in) {
  mx::Shape out = in[0].shape();
  out.back() = in[1].shape(0);
  return {out};
}

void QuantizedLinear::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array& x = in[0];
  cpu::LinearArgs a;
  a.xdtype = x.dtype();
  a.W.K = x.shape(-1);
  a.M = 1;
  for (std::size_t i = 0; i + 1 < x.ndim(); ++i) {
    a.M *= x.shape(i);
  }
  a.W.w = in[1].data<uint32_t>();
  a.W.scales = in[2].data<void>();
  a.W.biases = in[3].data<void>();
  a.W.sb_dtype = in[2].dtype();
  a.W.bits = bits_;
  a.W.group_size = group_size_;
  a.W.N = in[1].shape(0);
  a.y = out.data<void>();
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& i : in) {
    enc.set_input_array(i);
  }
  enc.set_output_array(out);
  // MLX keeps the inputs alive until this task has run, so raw pointers are safe; a
  // strided x (a slice, a transpose) is copied to rows when the task runs.
  enc.dispatch([a, x]() mutable {
    with_rows(x, [&](const void* rows) {
      a.x = rows;
      cpu::quantized_linear(a);
    });
  });
}

void QuantizedLinear::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // The op builder sends GPU streams to mx::quantized_matmul.
  throw std::runtime_error("[moequant.quantized_linear] no GPU kernel of its own.");
}

} // namespace moequant
