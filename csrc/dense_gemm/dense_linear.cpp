#include "dense_gemm/dense_linear.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_task.h"
#include "common/strided.h"
#include "common/cpu_path.h"
#include "common/thread_pool.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.dense_linear] " + msg);
}

// Rows of x per work item: the tile's panel of weights is rebuilt once per item.
constexpr int64_t kItemRows = 64;

template <typename T>
void to_float(const T* src, int64_t n, int64_t stride, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(src[i * stride]);
  }
}

// x (any strides) as float32 rows (M, K): the exact values (bf16 / f16 widen exactly).
void x_rows(const mx::array& x, int64_t M, int64_t K, float* dst) {
  const int64_t sk = x.strides().back();
  for (int64_t r = 0; r < M; ++r) {
    const int64_t off = row_offset(x, r);
    float* d = dst + r * K;
    switch (x.dtype()) {
      case mx::bfloat16:
        to_float(x.data<mx::bfloat16_t>() + off, K, sk, d);
        break;
      case mx::float16:
        to_float(x.data<mx::float16_t>() + off, K, sk, d);
        break;
      default:
        to_float(x.data<float>() + off, K, sk, d);
    }
  }
}

template <typename T>
void from_float(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<T>(src[i]); // MLX's rounding (nearest even)
  }
}

} // namespace

namespace dense_rows {

namespace {

template <WType W>
using WElem = std::conditional_t<
    W == WType::bf16,
    mx::bfloat16_t,
    std::conditional_t<W == WType::f16, mx::float16_t, float>>;

template <WType W>
void tile_scalar_typed(const Tile& t) {
  const WElem<W>* w = static_cast<const WElem<W>*>(t.w);
  for (int64_t n = t.n0; n < t.n1; ++n) {
    const WElem<W>* wn = w + n * t.ldw;
    for (int64_t m = 0; m < t.M; ++m) {
      const float* x = t.x + m * t.K;
      float c = 0.0f;
      for (int64_t k = 0; k < t.K; ++k) {
        const float p = x[k] * static_cast<float>(wn[k]); // rounded, then added (no contraction)
        c = c + p;
      }
      t.y[m * t.ldy + (n - t.n0)] = c;
    }
  }
}

} // namespace

void tile_scalar(const Tile& t) {
  with_wtype(t.wt, [&](auto w) { tile_scalar_typed<decltype(w)::value>(t); });
}

} // namespace dense_rows

mx::array dense_linear(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  if (!is_float(x.dtype()) || !is_float(w.dtype())) {
    fail(
        "x and w must be float32, float16 or bfloat16; got " + dtype_str(x.dtype()) + " and " +
        dtype_str(w.dtype()) + ".");
  }
  if (x.ndim() < 1 || w.ndim() != 2) {
    fail(
        "x must be (..., K) and w (N, K); got " + shape_str(x.shape()) + " and " +
        shape_str(w.shape()) + ".");
  }
  if (x.shape(-1) != w.shape(1)) {
    fail(
        "x's last dimension and w's second (K) differ: " + shape_str(x.shape()) + " and " +
        shape_str(w.shape()) + ".");
  }
  auto st = mx::to_stream(s);
  if (st.device == mx::Device::gpu) {
    return mx::matmul(x, mx::transpose(w, st), st);
  }
  mx::Shape out_shape = x.shape();
  out_shape.back() = w.shape(0);
  return mx::array(
      out_shape,
      mx::promote_types(x.dtype(), w.dtype()),
      std::make_shared<DenseLinear>(st),
      {x, w});
}

std::vector<mx::Shape> DenseLinear::output_shapes(const std::vector<mx::array>& in) {
  mx::Shape out = in[0].shape();
  out.back() = in[1].shape(0);
  return {out};
}

void DenseLinear::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array x = in[0], w = in[1];
  enqueue_cpu(stream(), in, {out}, [x, w, out]() mutable {
    const int64_t K = x.shape(-1), N = w.shape(0);
    const int64_t M = K ? static_cast<int64_t>(x.size()) / K
                        : static_cast<int64_t>(out.size()) / std::max<int64_t>(N, 1);
    if (M == 0 || N == 0) {
      return;
    }
    const bool f32_out = out.dtype() == mx::float32;
    std::vector<float> ybuf(f32_out ? 0 : static_cast<std::size_t>(M * N));
    float* y = f32_out ? out.data<float>() : ybuf.data();
    if (K == 0) {
      std::fill(y, y + M * N, 0.0f);
    } else {
      std::vector<float> xs(static_cast<std::size_t>(M * K));
      x_rows(x, M, K, xs.data());
      // The weight is read in place when it is row-contiguous (a parameter, or a slice
      // of its rows); anything else is copied once.
      with_rows(w, [&](const void* wp) {
        const int64_t ldw = K;
        const auto wt = w.dtype() == mx::bfloat16 ? dense_rows::WType::bf16
            : w.dtype() == mx::float16            ? dense_rows::WType::f16
                                                  : dense_rows::WType::f32;
        auto fn = &dense_rows::tile_scalar;
#if defined(__x86_64__) || defined(_M_X64)
        if (cpu::avx2_kernels_enabled()) {
          fn = &dense_rows::tile_avx2;
        }
#endif
        const int64_t tiles = (N + dense_rows::kTileRows - 1) / dense_rows::kTileRows;
        const int64_t mblocks = (M + kItemRows - 1) / kItemRows;
        // Each item is one tile of rows over a block of x's rows: the split changes which
        // thread computes an output, never its arithmetic.
        dynamic_for(tiles * mblocks, 1, [&](auto&& claim) {
          claim([&](std::size_t i0, std::size_t i1) {
            for (std::size_t it = i0; it < i1; ++it) {
              const int64_t tb = static_cast<int64_t>(it) % tiles,
                            mb = static_cast<int64_t>(it) / tiles;
              const int64_t m0 = mb * kItemRows;
              const int64_t n0 = tb * dense_rows::kTileRows;
              dense_rows::Tile t{
                  xs.data() + m0 * K,
                  std::min(kItemRows, M - m0),
                  K,
                  wp,
                  wt,
                  ldw,
                  n0,
                  std::min(N, n0 + dense_rows::kTileRows),
                  y + m0 * N + n0,
                  N};
              fn(t);
            }
          });
        });
      });
    }
    if (out.dtype() == mx::bfloat16) {
      from_float(y, M * N, out.data<mx::bfloat16_t>());
    } else if (out.dtype() == mx::float16) {
      from_float(y, M * N, out.data<mx::float16_t>());
    }
  });
}

void DenseLinear::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // The op builder sends GPU streams to mx::matmul.
  throw std::runtime_error("[moequant.dense_linear] no GPU kernel of its own.");
}

} // namespace moequant
