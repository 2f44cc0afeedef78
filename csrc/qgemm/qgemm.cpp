// The quantized GEMM driver (blocking, packing, dispatch) and its portable kernels.
#include "qgemm/qgemm.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/cpu_path.h"
#include "common/thread_pool.h"
#include "moe_swiglu/moe_swiglu_cpu.h"

namespace moequant::qgemm {

namespace mx = mlx::core;
using detail::Kernels;
using detail::kNR;

namespace {

// Blocking. A K chunk of kNC decoded rows (kNC * kKC * 4 = 48 KiB) stays in L2 while
// every row block of x (kKC * 16 * 4 = 16 KiB, L1) passes over it; the accumulators of
// a tile (kNC x kMC floats, 48 KiB) are reloaded once per K chunk. Weights are decoded
// once per kMC rows of x.
constexpr int kKC = 256;
constexpr int kNC = 8 * kNR;
constexpr int kMC = 256;
static_assert(kMC % kRowBlock == 0 && kKC % 128 == 0);

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.qgemm] " + msg);
}

// Scales or biases [off, off + n) of one matrix as floats.
void load_sb(const void* p, mx::Dtype t, std::size_t off, int n, float* dst) {
  cpu::load_floats(static_cast<const uint8_t*>(p) + off * mx::size_of(t), t, n, dst);
}

// Portable decode: 8 codes at a time from B bytes (MLX's little-endian bitstream).
template <int B>
void decode_scalar(const uint8_t* w, const float* s, const float* b, int kc, int G, float* dst) {
  constexpr uint64_t mask = (uint64_t(1) << B) - 1;
  for (int k = 0; k < kc; k += 8) {
    uint64_t v = 0;
    std::memcpy(&v, w + (k / 8) * B, B); // little-endian hosts (x86-64, arm64)
    const float sg = s[k / G];
    const float bg = b[k / G];
    for (int i = 0; i < 8; ++i) {
      dst[k + i] = sg * static_cast<float>((v >> (B * i)) & mask) + bg;
    }
  }
}

template <int R>
void kernel_scalar(
    const float* xb,
    const float* wd,
    int64_t ldw,
    int kc,
    float* c,
    int64_t ldc,
    bool accumulate) {
  float acc[kNR][R] = {};
  for (int k = 0; k < kc; ++k) {
    const float* xk = xb + k * kRowBlock;
    for (int j = 0; j < kNR; ++j) {
      const float w = wd[j * ldw + k];
      for (int i = 0; i < R; ++i) {
        acc[j][i] += xk[i] * w;
      }
    }
  }
  for (int j = 0; j < kNR; ++j) {
    for (int i = 0; i < R; ++i) {
      c[j * ldc + i] = accumulate ? c[j * ldc + i] + acc[j][i] : acc[j][i];
    }
  }
}

Kernels pick_kernels(int bits) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu::avx2_kernels_enabled()) {
    return detail::kernels_avx2(bits);
  }
#endif
  return detail::kernels_scalar(bits);
}

} // namespace

detail::Kernels micro_kernels() {
  return pick_kernels(8); // the micro-kernels do not depend on the bit width
}

namespace detail {

namespace {
template <int B>
struct DecodeScalar {
  static constexpr DecodeFn fn = &decode_scalar<B>;
};
} // namespace

Kernels kernels_scalar(int bits) {
  return {pick_bits<DecodeScalar>(bits), &kernel_scalar<16>, &kernel_scalar<8>};
}

} // namespace detail

void Activations::Free::operator()(float* p) const {
  ::operator delete(p, std::align_val_t(64));
}

Activations::Activations(
    const void* x,
    mx::Dtype dtype,
    int64_t M,
    int64_t ldx,
    int64_t K,
    const int64_t* rows)
    : M_(M), K_(K) {
  if (M < 0 || K < 0 || ldx < K) {
    fail(
        "bad activation shape (M " + std::to_string(M) + ", K " + std::to_string(K) + ", ldx " +
        std::to_string(ldx) + ").");
  }
  if (dtype != mx::float32 && dtype != mx::float16 && dtype != mx::bfloat16) {
    fail("activations must be float32, float16 or bfloat16.");
  }
  const int64_t nb = (M + kRowBlock - 1) / kRowBlock;
  const std::size_t n = static_cast<std::size_t>(std::max<int64_t>(nb, 1)) * K * kRowBlock;
  data_.reset(static_cast<float*>(::operator new(n * sizeof(float), std::align_val_t(64))));
  float* d = data_.get();
  std::vector<float> row(K);
  for (int64_t b = 0; b < nb; ++b) {
    float* db = d + static_cast<std::size_t>(b) * K * kRowBlock;
    for (int i = 0; i < kRowBlock; ++i) {
      const int64_t m = b * kRowBlock + i;
      if (m >= M) {
        for (int64_t k = 0; k < K; ++k) {
          db[k * kRowBlock + i] = 0.0f;
        }
        continue;
      }
      const std::size_t off = static_cast<std::size_t>(rows ? rows[m] : m) * ldx;
      const float* xr = static_cast<const float*>(x) + off;
      if (dtype != mx::float32) {
        cpu::load_floats(
            static_cast<const uint8_t*>(x) + off * mx::size_of(dtype), dtype, K, row.data());
        xr = row.data();
      }
      for (int64_t k = 0; k < K; ++k) {
        db[k * kRowBlock + i] = xr[k];
      }
    }
  }
}

void gemm(
    const Activations& x,
    const QuantWeight& W,
    int64_t n0,
    int64_t n1,
    float* y,
    int64_t ldy,
    int64_t m0,
    int64_t m1) {
  const int64_t K = W.K;
  const int G = W.group_size;
  if (x.K() != K) {
    fail("x has " + std::to_string(x.K()) + " columns, W has " + std::to_string(K) + ".");
  }
  check_bits_group("[moequant.qgemm] ", W.bits, G);
  if (K % G != 0) {
    fail("group_size must divide K.");
  }
  if (W.sb_dtype != mx::float32 && W.sb_dtype != mx::float16 && W.sb_dtype != mx::bfloat16) {
    fail("scales and biases must be float32, float16 or bfloat16.");
  }
  if (m1 < 0) {
    m1 = x.M();
  }
  if (n0 < 0 || n1 > W.N || n0 > n1 || m0 < 0 || m1 > x.M() || m0 > m1 || ldy < n1 - n0) {
    fail(
        "bad row ranges or output stride: W rows [" + std::to_string(n0) + ", " +
        std::to_string(n1) + ") of " + std::to_string(W.N) + ", x rows [" + std::to_string(m0) +
        ", " + std::to_string(m1) + ") of " + std::to_string(x.M()) + ", ldy " +
        std::to_string(ldy) + ".");
  }
  if (m0 % kRowBlock != 0) {
    fail(
        "m0 must be a multiple of kRowBlock (" + std::to_string(kRowBlock) + "); got " +
        std::to_string(m0) + ".");
  }
  if (n0 == n1 || m0 == m1) {
    return;
  }
  if (K == 0) {
    // An empty sum (the K loop below would leave y unwritten).
    for (int64_t m = m0; m < m1; ++m) {
      std::fill_n(y + (m - m0) * ldy, n1 - n0, 0.0f);
    }
    return;
  }
  const Kernels kern = pick_kernels(W.bits);
  const std::size_t row_bytes = static_cast<std::size_t>(K) * W.bits / 8;
  const int64_t ng = K / G;
  const auto* wbytes = reinterpret_cast<const uint8_t*>(W.w);

  // Per-thread scratch, reused across calls (gemm runs once per layer or expert).
  thread_local std::vector<float> wd;
  thread_local std::vector<float> acc;
  thread_local std::vector<float> sb;
  wd.resize(static_cast<std::size_t>(kNC) * kKC);
  acc.resize(static_cast<std::size_t>(kNC) * kMC);
  sb.resize(2 * (kKC / 32));

  for (int64_t mc0 = m0; mc0 < m1; mc0 += kMC) {
    const int64_t mc1 = std::min(m1, mc0 + kMC);
    for (int64_t nt0 = n0; nt0 < n1; nt0 += kNC) {
      const int nt = static_cast<int>(std::min<int64_t>(kNC, n1 - nt0));
      const int npad = (nt + kNR - 1) / kNR * kNR;
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int kc = static_cast<int>(std::min<int64_t>(kKC, K - k0));
        const int gc = kc / G;
        // The weights stream from memory once per tile: ask for the next K chunk of
        // the tile's rows (or the next tile's first) now, so it arrives while this
        // chunk's micro-kernels run (48 strided row streams defeat the hardware
        // prefetcher).
        {
          const bool last = k0 + kKC >= K;
          const int64_t pn0 = last ? nt0 + kNC : nt0;
          const int64_t pk0 = last ? 0 : k0 + kKC;
          const int64_t pn1 = std::min<int64_t>(last ? n1 : nt0 + nt, pn0 + kNC);
          const std::size_t pbytes =
              static_cast<std::size_t>(std::min<int64_t>(kKC, K - pk0)) * W.bits / 8;
          for (int64_t n = pn0; n < pn1; ++n) {
            const uint8_t* p = wbytes + n * row_bytes + static_cast<std::size_t>(pk0) * W.bits / 8;
            for (std::size_t off = 0; off < pbytes; off += 64) {
              __builtin_prefetch(p + off);
            }
          }
        }
        for (int r = 0; r < nt; ++r) {
          const int64_t n = nt0 + r;
          const std::size_t goff = static_cast<std::size_t>(n) * ng + k0 / G;
          load_sb(W.scales, W.sb_dtype, goff, gc, sb.data());
          load_sb(W.biases, W.sb_dtype, goff, gc, sb.data() + kKC / 32);
          kern.decode(
              wbytes + n * row_bytes + static_cast<std::size_t>(k0) * W.bits / 8,
              sb.data(),
              sb.data() + kKC / 32,
              kc,
              G,
              wd.data() + static_cast<std::size_t>(r) * kKC);
        }
        // Padding rows of the last micro-tile: zeros (their results are dropped).
        for (int r = nt; r < npad; ++r) {
          std::fill_n(wd.data() + static_cast<std::size_t>(r) * kKC, kc, 0.0f);
        }
        for (int64_t m = mc0; m < mc1; m += kRowBlock) {
          const float* xb = x.block(m / kRowBlock) + k0 * kRowBlock;
          const detail::KernelFn kf = mc1 - m <= 8 ? kern.rows8 : kern.rows16;
          for (int j = 0; j < npad; j += kNR) {
            kf(xb,
               wd.data() + static_cast<std::size_t>(j) * kKC,
               kKC,
               kc,
               acc.data() + static_cast<std::size_t>(j) * kMC + (m - mc0),
               kMC,
               k0 > 0);
          }
        }
      }
      for (int r = 0; r < nt; ++r) {
        const float* a = acc.data() + static_cast<std::size_t>(r) * kMC;
        float* yc = y + (nt0 + r - n0);
        for (int64_t m = mc0; m < mc1; ++m) {
          yc[(m - m0) * ldy] = a[m - mc0];
        }
      }
    }
  }
}

void gemm(
    const float* x,
    int64_t M,
    int64_t ldx,
    const QuantWeight& W,
    int64_t n0,
    int64_t n1,
    float* y,
    int64_t ldy) {
  const Activations xa(x, mx::float32, M, ldx, W.K);
  gemm(xa, W, n0, n1, y, ldy);
}

double fma_peak_gflops(double seconds) {
#if defined(__x86_64__) || defined(_M_X64)
  if (!cpu::avx2_kernels_enabled()) {
    return 0.0;
  }
  // Calibrate on one thread, then run every thread for about `seconds`.
  long iters = 1 << 16;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    volatile double sink = detail::fma_probe_avx2(iters);
    (void)sink;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > seconds / 8 || iters > (1L << 40)) {
      iters = static_cast<long>(iters * (seconds / std::max(dt, 1e-9)));
      break;
    }
    iters *= 4;
  }
  const int threads = get_num_threads();
  const auto t0 = std::chrono::steady_clock::now();
  parallel_for(threads, 1, [&](std::size_t, std::size_t) {
    volatile double sink = detail::fma_probe_avx2(iters);
    (void)sink;
  });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * 8 * 12 * static_cast<double>(iters) * threads / dt / 1e9;
#else
  (void)seconds;
  return 0.0;
#endif
}

const char* gemm_path() {
  return cpu::avx2_kernels_enabled() ? "avx2" : "scalar";
}

} // namespace moequant::qgemm
