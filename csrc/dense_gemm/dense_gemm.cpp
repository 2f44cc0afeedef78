#include "dense_gemm/dense_gemm.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "common/strided.h"
#include "common/cpu_task.h"
#include "common/thread_pool.h"
#include "mlx/backend/cpu/encoder.h"
#include "qgemm/qgemm.h"

namespace moequant {

namespace {

using qgemm::kRowBlock;
using qgemm::detail::kNR;

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.matmul_nt] " + msg);
}

// Rows of b (the micro-kernel's packed side, kRowBlock per block) per work item: their
// packed blocks (about 64 KiB) stay in L2 while every 6-row tile of a passes over them.
int64_t blocks_per_item(int64_t K) {
  return std::clamp<int64_t>((64 << 10) / (kRowBlock * 4 * std::max<int64_t>(K, 1)), 1, 8);
}

struct Args {
  const float* a;
  const float* b;
  float* y;
  int64_t batch, M, N, K;
};

void run(const Args& p) {
  const auto ker = qgemm::micro_kernels();
  const int64_t nblocks = (p.N + kRowBlock - 1) / kRowBlock;
  const int64_t per = blocks_per_item(p.K);
  const int64_t items_per_batch = (nblocks + per - 1) / per;
  // Claims of at least ~1M multiply-adds: a decode step's products (a few heads of one
  // query) run on the calling thread instead of paying a pool handoff each.
  const int64_t item_macs = std::max<int64_t>(1, p.M * p.K * per * kRowBlock);
  const auto grain = static_cast<std::size_t>(std::max<int64_t>(1, (int64_t(1) << 20) / item_macs));
  dynamic_for(p.batch * items_per_batch, grain, [&](auto&& claim) {
    alignas(64) float tile[kNR * kRowBlock];
    std::vector<float> apad(static_cast<std::size_t>(kNR) * p.K);
    claim([&](std::size_t i0, std::size_t i1) {
      for (std::size_t it = i0; it < i1; ++it) {
        const int64_t bt = static_cast<int64_t>(it) / items_per_batch;
        const int64_t n0 = (static_cast<int64_t>(it) % items_per_batch) * per * kRowBlock;
        const int64_t n1 = std::min(p.N, n0 + per * kRowBlock);
        const float* a = p.a + bt * p.M * p.K;
        float* y = p.y + bt * p.M * p.N;
        const qgemm::Activations xb(p.b + (bt * p.N + n0) * p.K, mx::float32, n1 - n0, p.K, p.K);
        for (int64_t m0 = 0; m0 < p.M; m0 += kNR) {
          const int rows = static_cast<int>(std::min<int64_t>(kNR, p.M - m0));
          const float* am = a + m0 * p.K;
          if (rows < kNR) {
            // The kernel always reads kNR rows of a: a zero-padded copy of the last ones.
            std::fill(apad.begin(), apad.end(), 0.0f);
            std::memcpy(apad.data(), am, sizeof(float) * rows * p.K);
            am = apad.data();
          }
          for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
            const int cols = static_cast<int>(std::min<int64_t>(kRowBlock, n1 - nb));
            const float* xbk = xb.block((nb - n0) / kRowBlock);
            const auto k = cols > 8 ? ker.rows16 : ker.rows8;
            if (rows == kNR && (cols == kRowBlock || cols == 8)) {
              k(xbk, am, p.K, static_cast<int>(p.K), y + m0 * p.N + nb, p.N, false);
              continue;
            }
            k(xbk, am, p.K, static_cast<int>(p.K), tile, kRowBlock, false);
            for (int r = 0; r < rows; ++r) {
              std::memcpy(y + (m0 + r) * p.N + nb, tile + r * kRowBlock, sizeof(float) * cols);
            }
          }
        }
      }
    });
  });
}

} // namespace

namespace cpu {

void matmul_nt(
    const float* a,
    const float* b,
    float* y,
    int64_t batch,
    int64_t M,
    int64_t N,
    int64_t K) {
  if (M == 0 || N == 0 || batch == 0) {
    return;
  }
  if (K == 0) {
    std::fill(y, y + batch * M * N, 0.0f);
    return;
  }
  run(Args{a, b, y, batch, M, N, K});
}

} // namespace cpu

mx::array matmul_nt(const mx::array& a, const mx::array& b, mx::StreamOrDevice s) {
  if (a.dtype() != mx::float32 || b.dtype() != mx::float32) {
    fail(
        "a and b must be float32; got " + dtype_str(a.dtype()) + " and " + dtype_str(b.dtype()) +
        ".");
  }
  if (a.ndim() < 2 || a.ndim() != b.ndim()) {
    fail(
        "a (..., M, K) and b (..., N, K) must have the same number (>= 2) of dimensions; "
        "got " +
        shape_str(a.shape()) + " and " + shape_str(b.shape()) + ".");
  }
  const int nd = static_cast<int>(a.ndim());
  for (int i = 0; i < nd - 2; ++i) {
    if (a.shape(i) != b.shape(i)) {
      fail(
          "a and b must have the same leading dimensions; got " + shape_str(a.shape()) + " and " +
          shape_str(b.shape()) + ".");
    }
  }
  if (a.shape(-1) != b.shape(-1)) {
    fail(
        "a's and b's last dimensions (K) differ: " + shape_str(a.shape()) + " and " +
        shape_str(b.shape()) + ".");
  }
  auto st = mx::to_stream(s);
  if (st.device == mx::Device::gpu) {
    return mx::matmul(a, mx::swapaxes(b, -1, -2, st), st);
  }
  mx::Shape out_shape = a.shape();
  out_shape.back() = b.shape(-2);
  // a and b go in as they are, of any strides (no Reshape / Contiguous nodes, ~8 us each
  // at decode): the primitive copies a strided one to rows at eval time.
  return mx::array(out_shape, mx::float32, std::make_shared<MatmulNT>(st), {a, b});
}

std::vector<mx::Shape> MatmulNT::output_shapes(const std::vector<mx::array>& in) {
  mx::Shape out = in[0].shape();
  out.back() = in[1].shape(-2);
  return {out};
}

void MatmulNT::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const mx::array a = in[0], b = in[1];
  int64_t batch = 1;
  for (std::size_t i = 0; i + 2 < a.ndim(); ++i) {
    batch *= a.shape(i);
  }
  Args p{nullptr, nullptr, out.data<float>(), batch, a.shape(-2), b.shape(-2), a.shape(-1)};
  enqueue_cpu(stream(), in, {out}, [p, a, b]() mutable {
    if (p.M == 0 || p.N == 0 || p.batch == 0) {
      return;
    }
    if (p.K == 0) {
      std::fill(p.y, p.y + p.batch * p.M * p.N, 0.0f);
      return;
    }
    // Strided views (a transpose, a slice) copied to rows here, after their producers ran.
    with_rows(a, [&](const void* ra) {
      with_rows(b, [&](const void* rb) {
        p.a = static_cast<const float*>(ra);
        p.b = static_cast<const float*>(rb);
        run(p);
      });
    });
  });
}

void MatmulNT::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // The op builder sends GPU streams to mx::matmul.
  throw std::runtime_error("[moequant.matmul_nt] no GPU kernel of its own.");
}

} // namespace moequant
