#include "norm_rope/norm_rope.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "common/cpu_task.h"
#include "common/strided.h"
#include "common/thread_pool.h"
#include "mlx/backend/cpu/simd/simd.h"
#include "mlx/fast.h"

namespace moequant {

namespace {

// Rows of at least ~16K elements per thread: a decode step's few rows stay on the
// calling thread (a pool hand-off costs more than the row).
constexpr int64_t kRowChunkElems = 1 << 14;

bool kernel_dtype(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

// The kernels reproduce MLX's scalar CPU path (simd width 1: x86 and other Linux builds).
// Where MLX's CPU ops are vectorized (Apple's Accelerate simd), its sum order differs:
// there the CPU stream runs MLX's own ops.
constexpr bool kScalarMlx = mx::simd::max_size<float> == 1;

template <typename F>
void for_rows(int64_t rows, int64_t D, F&& f) {
  const auto chunk =
      static_cast<std::size_t>(std::max<int64_t>(1, kRowChunkElems / std::max<int64_t>(1, D)));
  parallel_for(static_cast<std::size_t>(rows), chunk, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t r = r0; r < r1; ++r) {
      f(static_cast<int64_t>(r));
    }
  });
}

// ---------------------------------------------------------------- rms_norm
// mx.fast.rms_norm's CPU fallback (mlx/fast.cpp, MLX 0.32): x -> float32;
// mean(square(x)) as sum * float32(1 / D) where the sum is MLX's CPU reduction of a
// contiguous row (mlx/backend/cpu/reduce.cpp: scalar simd width on x86 Linux builds, a
// sequential float32 sum from 0); rsqrt(mean + eps) = 1 / sqrt(.); x * that; cast to the
// output dtype; times the weight in the output dtype.
template <typename TX, typename TO>
void rms_rows(const mx::array& x, const TO* w, TO* out, float eps) {
  const int64_t D = x.shape(-1), rows = static_cast<int64_t>(x.size()) / std::max<int64_t>(1, D);
  const int64_t sx = x.strides().back();
  const TX* xp = x.data<TX>();
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(D));
  for_rows(rows, D, [&](int64_t r) {
    const TX* xr = xp + row_offset(x, r);
    TO* y = out + r * D;
    float acc = 0.0f;
    for (int64_t j = 0; j < D; ++j) {
      const float v = static_cast<float>(xr[j * sx]);
      const float sq = v * v; // square, its own rounding (no contraction: -ffp-contract=off)
      acc = acc + sq;
    }
    const float mean = acc * inv_n;
    const float n = 1.0f / std::sqrt(mean + eps);
    for (int64_t j = 0; j < D; ++j) {
      const TO v = static_cast<TO>(static_cast<float>(xr[j * sx]) * n);
      y[j] = w ? static_cast<TO>(v * w[j]) : v;
    }
  });
}

template <typename TO>
void rms_dispatch_x(const mx::array& x, const TO* w, TO* out, float eps) {
  switch (x.dtype()) {
    case mx::float32:
      rms_rows<float, TO>(x, w, out, eps);
      break;
    case mx::float16:
      rms_rows<mx::float16_t, TO>(x, w, out, eps);
      break;
    case mx::bfloat16:
      rms_rows<mx::bfloat16_t, TO>(x, w, out, eps);
      break;
    default:
      throw std::runtime_error("[moequant.rms_norm] unsupported dtype.");
  }
}

// ---------------------------------------------------------------- rope
// mx.fast.rope's CPU fallback (forward): positions (t + offset) * scale in float32;
// inverse frequencies exp(-i * float32(log(base) / (dims / 2))) with MLX's simd exp, or
// 1 / freqs; theta = position * inverse frequency; cos and sin (MLX's simd sin/cos) cast
// to x's dtype; then x1 * c - x2 * s and x1 * s + x2 * c in x's dtype (each product and
// sum rounded to it), pairs (2i, 2i + 1) when traditional, (i, i + dims / 2) otherwise;
// features past dims copied.
template <typename T>
void rope_rows(
    const mx::array& x,
    const mx::array& offset,
    const float* freqs,
    T* out,
    int dims,
    bool traditional,
    float base,
    float scale) {
  namespace simd = mx::simd;
  const int64_t D = x.shape(-1), T_len = x.shape(-2), B = x.shape(0);
  const int64_t rows = static_cast<int64_t>(x.size()) / std::max<int64_t>(1, D);
  const int64_t per_batch = rows / std::max<int64_t>(1, B);
  const int64_t sx = x.strides().back();
  const T* xp = x.data<T>();
  const int32_t* op = offset.data<int32_t>();
  const int64_t so = offset.size() > 1 ? offset.strides()[0] : 0;
  const int half = dims / 2;
  std::vector<float> inv(half);
  if (freqs) {
    for (int i = 0; i < half; ++i) {
      inv[i] = 1.0f / freqs[i];
    }
  } else {
    const float coef = std::log(base) / half; // float log, as fast.cpp's std::log(float)
    for (int i = 0; i < half; ++i) {
      inv[i] = simd::exp(simd::Simd<float, 1>(static_cast<float>(-i) * coef)).value;
    }
  }
  for_rows(rows, D, [&](int64_t r) {
    const T* xr = xp + row_offset(x, r);
    T* y = out + r * D;
    const int64_t t = r % T_len, b = r / std::max<int64_t>(1, per_batch);
    const float pos = (static_cast<float>(t) + static_cast<float>(op[b * so])) * scale;
    for (int i = 0; i < half; ++i) {
      const float theta = pos * inv[i];
      const T c = static_cast<T>(simd::cos(simd::Simd<float, 1>(theta)).value);
      const T s = static_cast<T>(simd::sin(simd::Simd<float, 1>(theta)).value);
      const int64_t i1 = traditional ? 2 * i : i, i2 = traditional ? 2 * i + 1 : i + half;
      const T x1 = xr[i1 * sx], x2 = xr[i2 * sx];
      y[i1] = static_cast<T>(static_cast<T>(x1 * c) - static_cast<T>(x2 * s));
      y[i2] = static_cast<T>(static_cast<T>(x1 * s) + static_cast<T>(x2 * c));
    }
    for (int64_t j = dims; j < D; ++j) {
      y[j] = xr[j * sx];
    }
  });
}

} // namespace

mx::array rms_norm(
    const mx::array& x,
    const std::optional<mx::array>& weight,
    float eps,
    mx::StreamOrDevice s_) {
  auto st = mx::to_stream(s_);
  const bool shape_ok = x.ndim() >= 1 &&
      (!weight || (weight->ndim() == 1 && weight->size() == static_cast<std::size_t>(x.shape(-1))));
  const auto out_type = weight ? mx::promote_types(x.dtype(), weight->dtype()) : x.dtype();
  // GPU streams, other dtypes and bad arguments: MLX's own op (its kernels, its errors).
  if (st.device != mx::Device::cpu || !kScalarMlx || !shape_ok || !kernel_dtype(x.dtype()) ||
      !kernel_dtype(out_type)) {
    return mx::fast::rms_norm(x, weight, eps, st);
  }
  std::vector<mx::array> in{x};
  if (weight) {
    in.push_back(mx::astype(*weight, out_type, st)); // fast.cpp casts it the same way
  }
  return mx::array(x.shape(), out_type, std::make_shared<RMSNormRows>(st, eps), std::move(in));
}

void RMSNormRows::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array x = in[0];
  const bool has_w = in.size() > 1;
  // The weight is 1-D: read in place, or copied in the task if it is a strided view.
  const mx::array w = has_w ? in[1] : x;
  const float eps = eps_;
  mx::array o = out;
  enqueue_cpu(stream(), in, {out}, [x, w, has_w, o, eps]() mutable {
    auto run = [&](auto tag) {
      using TO = decltype(tag);
      std::vector<TO> wc;
      const TO* wp = nullptr;
      if (has_w) {
        const int64_t D = w.size(), sw = w.strides()[0];
        const TO* src = w.data<TO>();
        if (sw == 1) {
          wp = src;
        } else {
          wc.resize(D);
          for (int64_t j = 0; j < D; ++j) {
            wc[j] = src[j * sw];
          }
          wp = wc.data();
        }
      }
      rms_dispatch_x<TO>(x, wp, o.data<TO>(), eps);
    };
    switch (o.dtype()) {
      case mx::float32:
        run(float{});
        break;
      case mx::float16:
        run(mx::float16_t{});
        break;
      default:
        run(mx::bfloat16_t{});
        break;
    }
  });
}

void RMSNormRows::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[moequant.rms_norm] no GPU kernel of its own (GPU streams use mx.fast.rms_norm).");
}

mx::array rope(
    const mx::array& x,
    int dims,
    bool traditional,
    std::optional<float> base,
    float scale,
    const mx::array& offset,
    const std::optional<mx::array>& freqs,
    mx::StreamOrDevice s_) {
  auto st = mx::to_stream(s_);
  const bool ok = x.ndim() >= 3 && kernel_dtype(x.dtype()) && dims > 0 && dims % 2 == 0 &&
      dims <= x.shape(-1) && offset.ndim() <= 1 && mx::issubdtype(offset.dtype(), mx::integer) &&
      (offset.size() == 1 || offset.size() == static_cast<std::size_t>(x.shape(0))) &&
      (freqs.has_value() != base.has_value()) &&
      (!freqs || (freqs->ndim() == 1 && freqs->shape(0) == dims / 2));
  // GPU streams, other dtypes and bad arguments: MLX's own op (its kernels, its errors).
  if (st.device != mx::Device::cpu || !kScalarMlx || !ok) {
    return mx::fast::rope(x, dims, traditional, base, scale, offset, freqs, st);
  }
  std::vector<mx::array> in{
      x, offset.dtype() == mx::int32 ? offset : mx::astype(offset, mx::int32, st)};
  if (freqs) {
    in.push_back(mx::astype(*freqs, mx::float32, st));
  }
  return mx::array(
      x.shape(),
      x.dtype(),
      std::make_shared<RoPERows>(st, dims, traditional, base.value_or(1.0f), scale),
      std::move(in));
}

void RoPERows::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array x = in[0], off = in[1];
  const std::optional<mx::array> f = in.size() > 2 ? std::optional<mx::array>(in[2]) : std::nullopt;
  mx::array o = out;
  const int dims = dims_;
  const bool trad = traditional_;
  const float base = base_, scale = scale_;
  enqueue_cpu(stream(), in, {out}, [x, off, f, o, dims, trad, base, scale]() mutable {
    // The dims / 2 frequencies, read when the task runs (after their producer).
    std::vector<float> fr;
    if (f) {
      fr.resize(f->size());
      for (std::size_t i = 0; i < fr.size(); ++i) {
        fr[i] = f->data<float>()[i * f->strides()[0]];
      }
    }
    const float* fp = fr.empty() ? nullptr : fr.data();
    switch (x.dtype()) {
      case mx::float32:
        rope_rows<float>(x, off, fp, o.data<float>(), dims, trad, base, scale);
        break;
      case mx::float16:
        rope_rows<mx::float16_t>(x, off, fp, o.data<mx::float16_t>(), dims, trad, base, scale);
        break;
      default:
        rope_rows<mx::bfloat16_t>(x, off, fp, o.data<mx::bfloat16_t>(), dims, trad, base, scale);
        break;
    }
  });
}

void RoPERows::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[moequant.rope] no GPU kernel of its own (GPU streams use mx.fast.rope).");
}

} // namespace moequant
