#include "softmax_rows/softmax_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "common/strided.h"
#include "common/cpu_task.h"
#include "common/thread_pool.h"
#include "mlx/backend/cpu/encoder.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.softmax_rows] " + msg);
}

struct Args {
  const float* s;
  const bool* mask; // (L, S) or null
  float* p;
  int64_t rows, L, S;
  float scale;
};

void row(const Args& a, int64_t r) {
  const float* x = a.s + r * a.S;
  float* y = a.p + r * a.S;
  const bool* mk = a.mask ? a.mask + (r % a.L) * a.S : nullptr;
  float mx = -std::numeric_limits<float>::infinity();
  int64_t allowed = 0;
  for (int64_t j = 0; j < a.S; ++j) {
    if (!mk || mk[j]) {
      mx = std::max(mx, a.scale * x[j]);
      ++allowed;
    }
  }
  if (allowed == 0) {
    std::fill(y, y + a.S, 1.0f / static_cast<float>(a.S));
    return;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < a.S; ++j) {
    const float e = (!mk || mk[j]) ? std::exp(a.scale * x[j] - mx) : 0.0f;
    y[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < a.S; ++j) {
    y[j] *= inv;
  }
}

} // namespace

namespace cpu {

void softmax_rows(const float* s, float* p, int64_t rows, int64_t S, float scale) {
  if (S == 0) {
    return;
  }
  const Args a{s, nullptr, p, rows, 1, S, scale};
  // The op's chunks: short rows (decode) stay on the calling thread.
  const auto chunk = static_cast<std::size_t>(std::max<int64_t>(1, (int64_t(1) << 16) / S));
  parallel_for(static_cast<std::size_t>(rows), chunk, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t r = r0; r < r1; ++r) {
      row(a, static_cast<int64_t>(r));
    }
  });
}

} // namespace cpu

mx::array softmax_rows(
    const mx::array& s,
    const std::optional<mx::array>& mask,
    float scale,
    mx::StreamOrDevice st_) {
  if (s.dtype() != mx::float32) {
    fail("s must be float32; got " + dtype_str(s.dtype()) + ".");
  }
  if (s.ndim() < 2) {
    fail("s must have shape (..., L, S); got " + shape_str(s.shape()) + ".");
  }
  const int L = s.shape(-2), S = s.shape(-1);
  if (mask) {
    if (mask->dtype() != mx::bool_) {
      fail("mask must be bool; got " + dtype_str(mask->dtype()) + ".");
    }
    if (mask->shape() != mx::Shape{L, S}) {
      fail(
          "mask must have shape (L, S) = " + shape_str(mx::Shape{L, S}) + "; got " +
          shape_str(mask->shape()) + ".");
    }
  }
  auto st = mx::to_stream(st_);
  if (st.device == mx::Device::gpu) {
    auto x = mx::multiply(s, mx::array(scale), st);
    if (mask) {
      x = mx::where(*mask, x, mx::array(-std::numeric_limits<float>::max()), st);
    }
    auto p = mx::softmax(x, std::vector<int>{-1}, true, st);
    return mask ? mx::where(*mask, p, mx::array(0.0f), st) : p;
  }
  // s goes in as it is (no Reshape / Contiguous nodes, ~8 us each at decode); a strided
  // view is copied to rows at eval time.
  std::vector<mx::array> in{s};
  if (mask) {
    in.push_back(contiguous_as(*mask, mask->shape(), st));
  }
  return mx::array(s.shape(), mx::float32, std::make_shared<SoftmaxRows>(st, scale), in);
}

void SoftmaxRows::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array sc = in[0];
  const int64_t S = sc.ndim() ? sc.shape(-1) : 1;
  Args a{
      nullptr,
      in.size() > 1 ? in[1].data<bool>() : nullptr,
      out.data<float>(),
      S ? static_cast<int64_t>(sc.size()) / S : 0,
      in.size() > 1 ? in[1].shape(0) : 1,
      S,
      scale_};
  enqueue_cpu(stream(), in, {out}, [a, sc]() mutable {
    if (a.S == 0) {
      return;
    }
    // A strided view is copied to rows here (after its producer ran).
    with_rows(sc, [&](const void* rows) {
      a.s = static_cast<const float*>(rows);
      // Chunks of at least ~64K elements: short rows (decode) stay on the calling thread.
      const auto chunk = static_cast<std::size_t>(std::max<int64_t>(1, (int64_t(1) << 16) / a.S));
      parallel_for(static_cast<std::size_t>(a.rows), chunk, [&](std::size_t r0, std::size_t r1) {
        for (std::size_t r = r0; r < r1; ++r) {
          row(a, static_cast<int64_t>(r));
        }
      });
    });
  });
}

void SoftmaxRows::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[moequant.softmax_rows] no GPU kernel of its own.");
}

} // namespace moequant
