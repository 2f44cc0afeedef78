#include "quantized_linear/quantized_multi_linear.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_task.h"
#include "common/strided.h"
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
  // x goes in as it is, of any strides (a slice of the query projection, a transpose of
  // the attention output: no Reshape / Contiguous nodes, ~8 us each at decode); the
  // primitive copies a strided view at eval time. The weights are evaluated and
  // row-contiguous (contiguous_as passes them as they are).
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), st); };
  return mx::array(
      out_shape,
      x.dtype(),
      std::make_shared<QuantizedMultiLinear>(st, bits, group_size),
      {x, c(w), c(scales), c(biases)});
}

bool QuantizedMultiLinear::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedMultiLinear&>(other);
  return bits_ == o.bits_ && group_size_ == o.group_size_;
}

std::vector<mx::Shape> QuantizedMultiLinear::output_shapes(const std::vector<mx::array>& in) {
  mx::Shape out = in[0].shape();
  out.back() = in[1].shape(1);
  return {out};
}

void QuantizedMultiLinear::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array& x = in[0]; // (..., H, M, K)
  cpu::MultiLinearArgs a;
  a.batch = 1;
  for (std::size_t i = 0; i + 3 < x.ndim(); ++i) {
    a.batch *= x.shape(i);
  }
  a.heads = x.shape(-3);
  a.rows.xdtype = x.dtype();
  a.rows.M = x.shape(-2);
  a.rows.W.w = in[1].data<uint32_t>();
  a.rows.W.scales = in[2].data<void>();
  a.rows.W.biases = in[3].data<void>();
  a.rows.W.sb_dtype = in[2].dtype();
  a.rows.W.bits = bits_;
  a.rows.W.group_size = group_size_;
  a.rows.W.N = in[1].shape(1);
  a.rows.W.K = x.shape(-1);
  a.rows.y = out.data<void>();
  // MLX keeps the inputs alive until this task has run, so raw pointers are safe; a
  // strided x is copied to rows when the task runs (after x's producer has written it).
  enqueue_cpu(stream(), in, {out}, [a, x]() mutable {
    with_rows(x, [&](const void* rows) {
      a.rows.x = rows;
      cpu::quantized_multi_linear(a);
    });
  });
}

void QuantizedMultiLinear::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // The op builder sends GPU streams to mx::quantized_matmul.
  throw std::runtime_error("[moequant.quantized_multi_linear] no GPU kernel of its own.");
}

} // namespace moequant
