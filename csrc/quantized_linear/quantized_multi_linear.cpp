#include "quantized_linear/quantized_multi_linear.h"

#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "common/cpu_task.h"
#include "quantized_linear/quantized_linear.h"
#include "quantized_linear/quantized_linear_cpu.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.quantized_multi_linear] " + msg);
}

} // namespace

mx::array quantized_multi_linear(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  if (x.ndim() < 3) {
    fail("x must have shape (..., H, M, K); got " + shape_str(x.shape()) + ".");
  }
  check_quantized_matmul_args(
      "[moequant.quantized_multi_linear] ",
      "(H, N, K*bits/32)",
      x,
      w,
      scales,
      biases,
      1,
      bits,
      group_size);
  const int H = w.shape(0);
  const int N = w.shape(1);
  const int M = x.shape(-2);
  const int K = x.shape(-1);
  if (x.shape(-3) != H) {
    fail(
        "x's heads axis (-3) has " + std::to_string(x.shape(-3)) + " entries, w has " +
        std::to_string(H) + " heads: x " + shape_str(x.shape()) + ", w " + shape_str(w.shape()) +
        ".");
  }
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
  int batch = 1;
  for (std::size_t i = 0; i + 3 < x.ndim(); ++i) {
    batch *= x.shape(i);
  }
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), st); };
  auto y = mx::array(
      {batch, H, M, N},
      x.dtype(),
      std::make_shared<QuantizedMultiLinear>(st, bits, group_size),
      {contiguous_as(x, {batch, H, M, K}, st), c(w), c(scales), c(biases)});
  return mx::reshape(y, out_shape, st);
}

bool QuantizedMultiLinear::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedMultiLinear&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> QuantizedMultiLinear::output_shapes(const std::vector<mx::array>& in) {
  return {{in[0].shape(0), in[0].shape(1), in[0].shape(2), in[1].shape(1)}};
}

void QuantizedMultiLinear::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  cpu::MultiLinearArgs a;
  a.batch = in[0].shape(0);
  a.heads = in[0].shape(1);
  a.rows.x = in[0].data<void>();
  a.rows.xdtype = in[0].dtype();
  a.rows.M = in[0].shape(2);
  a.rows.W.w = in[1].data<uint32_t>();
  a.rows.W.scales = in[2].data<void>();
  a.rows.W.biases = in[3].data<void>();
  a.rows.W.sb_dtype = in[2].dtype();
  a.rows.W.bits = bits_;
  a.rows.W.group_size = group_size_;
  a.rows.W.N = in[1].shape(1);
  a.rows.W.K = in[0].shape(3);
  a.rows.y = out.data<void>();
  // MLX keeps the inputs alive until this task has run, so raw pointers are safe.
  enqueue_cpu(stream(), in, {out}, [a]() { cpu::quantized_multi_linear(a); });
}

void QuantizedMultiLinear::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // The op builder sends GPU streams to mx::quantized_matmul.
  throw std::runtime_error("[moequant.quantized_multi_linear] no GPU kernel of its own.");
}

} // namespace moequant
