#include "embedding/quantized_embedding.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "common/cpu_task.h"
#include "common/strided.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.quantized_embedding] " + msg);
}

// Code i of a packed row: bits [i * bits, (i + 1) * bits) of its little-endian bitstream
// (docs/mlx-facts 2: one rule for every bit width).
inline uint32_t code_at(const uint8_t* row, int64_t row_bytes, int64_t i, int bits) {
  const int64_t p = i * bits;
  const int64_t byte = p >> 3;
  uint32_t v = row[byte];
  if (byte + 1 < row_bytes) {
    v |= uint32_t(row[byte + 1]) << 8;
  }
  return (v >> (p & 7)) & ((1u << bits) - 1);
}

template <typename T>
void lookup(
    const mx::array& ids,
    const mx::array& w,
    const mx::array& sc,
    const mx::array& bi,
    T* out,
    int bits,
    int g) {
  const int64_t V = w.shape(0), row_bytes = w.shape(1) * 4, n_groups = sc.shape(1);
  const int64_t K = n_groups * g;
  const auto* wp = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
  const T* sp = sc.data<T>();
  const T* bp = bi.data<T>();
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t sl = ids.ndim() ? ids.strides().back() : 0;
  for (int64_t r = 0; r < n; ++r) {
    // ids as (n, 1) rows of its last axis: element r's offset.
    const int64_t last = ids.ndim() ? ids.shape(-1) : 1;
    const int64_t off = (ids.ndim() ? row_offset(ids, r / last) : 0) + (r % last) * sl;
    int64_t id = ids.dtype() == mx::int64 || ids.dtype() == mx::uint64
        ? ids.data<int64_t>()[off]
        : static_cast<int64_t>(
              ids.dtype() == mx::uint32 ? int64_t(ids.data<uint32_t>()[off])
                                        : int64_t(ids.data<int32_t>()[off]));
    T* y = out + r * K;
    if (id < 0) {
      id += V;
    }
    if (id < 0 || id >= V) {
      std::fill(y, y + K, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    const uint8_t* row = wp + id * row_bytes;
    for (int64_t gi = 0; gi < n_groups; ++gi) {
      const T s = sp[id * n_groups + gi], b = bp[id * n_groups + gi];
      for (int j = 0; j < g; ++j) {
        const int64_t i = gi * g + j;
        const T q = static_cast<T>(static_cast<float>(code_at(row, row_bytes, i, bits)));
        y[i] = static_cast<T>(static_cast<T>(q * s) + b);
      }
    }
  }
}

} // namespace

mx::array quantized_embedding(
    const mx::array& ids,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int bits,
    int group_size,
    mx::StreamOrDevice s) {
  check_bits_group("[moequant.quantized_embedding] ", bits, group_size);
  if (!(ids.dtype() == mx::int32 || ids.dtype() == mx::int64 || ids.dtype() == mx::uint32)) {
    fail("ids must be int32, int64 or uint32; got " + dtype_str(ids.dtype()) + ".");
  }
  if (w.dtype() != mx::uint32 || w.ndim() != 2) {
    fail(
        "w must be a 2-D uint32 array (V, K*bits/32); got " + dtype_str(w.dtype()) + " " +
        shape_str(w.shape()) + ".");
  }
  if (!is_float(scales.dtype()) || biases.dtype() != scales.dtype()) {
    fail(
        "scales and biases must be float32, float16 or bfloat16 of one dtype; got " +
        dtype_str(scales.dtype()) + " and " + dtype_str(biases.dtype()) + ".");
  }
  const int V = w.shape(0);
  const int64_t K = int64_t(w.shape(1)) * 32 / bits;
  const mx::Shape want_s{V, static_cast<int>(K / group_size)};
  if (K % group_size != 0 || scales.shape() != want_s || biases.shape() != want_s) {
    fail(
        "scales and biases must have shape " + shape_str(want_s) + " for w " +
        shape_str(w.shape()) + " at " + std::to_string(bits) + " bits, group_size " +
        std::to_string(group_size) + "; got " + shape_str(scales.shape()) + " and " +
        shape_str(biases.shape()) + ".");
  }
  auto st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) {
    return mx::dequantize(
        mx::take(w, ids, 0, st),
        mx::take(scales, ids, 0, st),
        mx::take(biases, ids, 0, st),
        group_size,
        bits,
        "affine",
        std::nullopt,
        std::nullopt,
        st);
  }
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), st); };
  mx::Shape out_shape = ids.shape();
  out_shape.push_back(static_cast<int>(K));
  return mx::array(
      out_shape,
      scales.dtype(),
      std::make_shared<QuantizedEmbedding>(st, bits, group_size),
      {ids, c(w), c(scales), c(biases)});
}

std::vector<mx::Shape> QuantizedEmbedding::output_shapes(const std::vector<mx::array>& in) {
  mx::Shape out = in[0].shape();
  out.push_back(in[2].shape(1) * group_size_);
  return {out};
}

void QuantizedEmbedding::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array ids = in[0], w = in[1], sc = in[2], bi = in[3];
  const int bits = bits_, g = group_size_;
  mx::array o = out;
  enqueue_cpu(stream(), in, {out}, [ids, w, sc, bi, o, bits, g]() mutable {
    switch (o.dtype()) {
      case mx::float32:
        lookup<float>(ids, w, sc, bi, o.data<float>(), bits, g);
        break;
      case mx::float16:
        lookup<mx::float16_t>(ids, w, sc, bi, o.data<mx::float16_t>(), bits, g);
        break;
      default:
        lookup<mx::bfloat16_t>(ids, w, sc, bi, o.data<mx::bfloat16_t>(), bits, g);
        break;
    }
  });
}

void QuantizedEmbedding::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[moequant.quantized_embedding] no GPU kernel of its own (GPU streams use MLX's ops).");
}

} // namespace moequant
