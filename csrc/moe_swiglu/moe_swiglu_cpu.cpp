// CPU twin of metal/moe_swiglu.h.
//
// Both phases are row dot products of quantized expert rows with one float vector
// (x for gate/up, the SwiGLU intermediate h for down), each weight byte read once.
// Per affine group, sum_i x_i (s q_i + b) = s * sum_i x_i q_i + b * sum_i x_i, so the
// group sums of the vector are computed once per vector and the inner loop is only
// sum_i x_i q_i. The SIMD row kernels, chosen at run time, need the vector in their
// own form, made here once per vector: the float kernels (AVX-512 or AVX2, see
// moe_rows_simd.inc) permuted into their lane order; the integer kernels as block
// fixed point: 2/3/4-bit rows with AVX-512 VNNI (moe_rows_vnni.cpp) in signed byte
// digits, all widths but 5 with AVX2 (moe_rows_avx2int.inc) in 16-bit words. 5-bit
// rows and other CPUs use the portable scalar rows below.
#include "moe_swiglu/moe_swiglu_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "mlx/types/half_types.h"
#include "moe_swiglu/moe_rows.h"

#if defined(__x86_64__) || defined(_M_X64)
#define MQ_X86 1
#include <emmintrin.h> // SSE2: every x86-64 CPU, no dispatch needed
#endif

namespace moequant::cpu {

namespace mx = mlx::core;

namespace {

// Ordered: a CPU that runs a path runs every path before it (current_path caps with min).
// avx2int is the AVX2 integer kernels (avx2 their float twins, kept as a tested
// fallback); an AVX-512 CPU runs its own kernels instead.
enum class Path { scalar, avx2, avx2int, avx512, avx512vnni };

Path detect_path() {
#ifdef MQ_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    // Every CPU with VBMI but one (Cannon Lake) also has VNNI and GFNI.
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("gfni")) {
      return Path::avx512vnni;
    }
    return Path::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Path::avx2int;
  }
#endif
  return Path::scalar;
}

// MOEQUANT_CPU_PATH=scalar|avx2|avx2int|avx512 caps the path (read per call, for tests
// and benchmarks; avx512 is the float AVX-512 kernels without the integer ones, avx2 the
// float AVX2 kernels).
Path current_path() {
  static const Path best = detect_path();
  const char* e = std::getenv("MOEQUANT_CPU_PATH");
  Path cap = best;
  if (e && std::string(e) == "scalar") {
    cap = Path::scalar;
  } else if (e && std::string(e) == "avx2") {
    cap = Path::avx2;
  } else if (e && std::string(e) == "avx2int") {
    cap = Path::avx2int;
  } else if (e && std::string(e) == "avx512") {
    cap = Path::avx512;
  }
  return std::min(cap, best);
}

// The kernel form of one matrix on this path: float SIMD lanes (0: none), integer
// digits (0: none; 3 for float32 activations, 2 for bf16/f16 ones) or integer word
// levels (0: none; 2 for float32 activations, 1 for bf16/f16 ones), see moe_rows.h.
struct Layout {
  int lanes = 0;
  int digits = 0;
  int levels = 0;
};

Layout layout_for(int bits, Path path, mx::Dtype act) {
  if (bits == 5 || path == Path::scalar) {
    return {};
  }
  if (path == Path::avx512vnni && int_bits(bits)) {
    return {0, act == mx::float32 ? 3 : 2, 0};
  }
  const int levels = act == mx::float32 ? 2 : 1;
  if (path == Path::avx2int && w16_bits(bits, levels)) {
    return {0, 0, levels};
  }
  return {path <= Path::avx2int ? 8 : 16, 0, 0};
}

// Vectors whose data start on a cache line: the row kernels load the prepared vector
// in 64-byte registers, and a load that straddles two lines costs two.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) {
    ::operator delete(p, std::align_val_t(64));
  }
  template <typename U>
  bool operator==(const LineAligned<U>&) const {
    return true;
  }
};

// Per-vector strides rounded up to whole cache lines, so every vector starts on one.
constexpr std::size_t line_stride(std::size_t bytes) {
  return (bytes + 63) / 64 * 64;
}

class PrepBuf {
 public:
  PrepBuf(const float* x, std::size_t n, int cols, int bits, int G, Layout L)
      : x_(x),
        cols_(cols),
        G_(G),
        xps_(line_stride(cols * sizeof(float)) / sizeof(float)),
        xds_(line_stride(static_cast<std::size_t>(cols) * L.digits)),
        xws_(line_stride(static_cast<std::size_t>(cols) * L.levels * 2) / 2),
        xp_(L.lanes ? n * xps_ : 0),
        gs_(n * (cols / G)),
        xd_(L.digits ? n * xds_ : 0),
        xw_(L.levels ? n * xws_ : 0),
        sx_(L.digits || L.levels ? n * (cols / G) : 0),
        sx_scale_(n, 1.0f) {
    for (std::size_t t = 0; t < n; ++t) {
      const float* v = x + t * cols;
      group_sums(v, cols / G, G, gs_.data() + t * (cols / G));
      if (L.lanes) {
        permute(v, xp_.data() + t * xps_, bits, L.lanes);
      }
      if (L.digits) {
        sx_scale_[t] =
            digits(v, xd_.data() + t * xds_, sx_.data() + t * (cols / G), bits, L.digits);
      }
      if (L.levels) {
        sx_scale_[t] = words(v, xw_.data() + t * xws_, sx_.data() + t * (cols / G), bits, L.levels);
      }
    }
  }
  Prep at(std::size_t t) const {
    return {
        x_ + t * cols_,
        xp_.empty() ? nullptr : xp_.data() + t * xps_,
        gs_.data() + t * (cols_ / G_),
        xd_.empty() ? nullptr : xd_.data() + t * xds_,
        xw_.empty() ? nullptr : xw_.data() + t * xws_,
        sx_.empty() ? nullptr : sx_.data() + t * (cols_ / G_),
        sx_scale_[t]};
  }

 private:
  // Each group's sum of v in order (one add chain per group, 4 groups side by side): part
  // of every call's serial x preparation, so 4 x 4 blocks are transposed into registers
  // (the same additions in the same order as the scalar loop).
  static void group_sums(const float* v, int ng, int G, float* gs) {
    int g0 = 0;
#ifdef MQ_X86
    for (; g0 + 4 <= ng; g0 += 4) {
      const float* r = v + static_cast<std::size_t>(g0) * G;
      __m128 acc = _mm_setzero_ps();
      int i = 0;
      for (; i + 4 <= G; i += 4) {
        __m128 a = _mm_loadu_ps(r + i), b = _mm_loadu_ps(r + G + i);
        __m128 c = _mm_loadu_ps(r + 2 * G + i), d = _mm_loadu_ps(r + 3 * G + i);
        _MM_TRANSPOSE4_PS(a, b, c, d); // a: element i of the 4 groups, b: i + 1, ...
        acc = _mm_add_ps(_mm_add_ps(_mm_add_ps(_mm_add_ps(acc, a), b), c), d);
      }
      alignas(16) float s[4];
      _mm_store_ps(s, acc);
      for (; i < G; ++i) {
        for (int j = 0; j < 4; ++j) {
          s[j] += r[j * G + i];
        }
      }
      std::copy(s, s + 4, gs + g0);
    }
#endif
    for (int g = g0; g < ng; ++g) {
      float s = 0.0f;
      for (int i = 0; i < G; ++i) {
        s += v[g * G + i];
      }
      gs[g] = s;
    }
  }

  // The largest |v[i]| of n values as float bits, sign cleared: for non-negative floats
  // the bits order as the values do, so an integer max gives the exact float max, and a
  // result above FLT_MAX's bits says the values hold inf or NaN.
  static uint32_t max_abs_bits(const float* v, int n) {
    uint32_t m = 0;
    int i = 0;
#ifdef MQ_X86
    const __m128i mag = _mm_set1_epi32(0x7fffffff);
    __m128i mv = _mm_setzero_si128();
    for (; i + 4 <= n; i += 4) {
      // Signed compare: the cleared sign bit makes every lane non-negative.
      const __m128i a =
          _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i)), mag);
      const __m128i gt = _mm_cmpgt_epi32(a, mv);
      mv = _mm_or_si128(_mm_and_si128(gt, a), _mm_andnot_si128(gt, mv));
    }
    alignas(16) uint32_t lanes[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), mv);
    m = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
#endif
    for (; i < n; ++i) {
      uint32_t b;
      std::memcpy(&b, v + i, 4);
      m = std::max(m, b & 0x7fffffffu);
    }
    return m;
  }

  // xp[block][k][lane] = x[block][lane * CPL + k] * 2^-(bits*k) (exact, bits*k <= 28),
  // unscaled for the top code of a full lane and the table-decoded codes.
  void permute(const float* v, float* xp, int bits, int lanes) const {
    const int cpl = simd_cpl(bits);
    const int blk = lanes * cpl;
    const bool top_shifted = simd_nb(bits) == 4;
    for (int b = 0; b < cols_ / blk; ++b) {
      for (int k = 0; k < cpl; ++k) {
        const bool unscaled = (top_shifted && k == cpl - 1) || simd_table_code(bits, lanes, k);
        const float scale = unscaled ? 1.0f : 1.0f / static_cast<float>(1u << (bits * k));
        for (int l = 0; l < lanes; ++l) {
          xp[b * blk + lanes * k + l] = v[b * blk + l * cpl + k] * scale;
        }
      }
    }
  }

  // Per group sx = max|x| / xmax and X = round(x / sx), |X| <= xmax. A group holding
  // inf or NaN gets sx = NaN, so its rows come out NaN, never finite. Returns the power
  // of two S that the stored sx are divided by (exactly), just above the largest sx:
  // tiny vectors (SwiGLU outputs of tiny inputs) would otherwise make s_w * sx
  // subnormal.
  float fixed_point(const float* v, int xmax, float* sx, std::vector<int32_t>& X) const {
    X.resize(cols_);
    for (int g = 0; g < cols_ / G_; ++g) {
      const uint32_t mb = max_abs_bits(v + g * G_, G_);
      const bool finite = mb <= 0x7f7fffffu; // FLT_MAX: false for inf and NaN
      float m;
      std::memcpy(&m, &mb, 4);
      if (!finite) {
        sx[g] = std::numeric_limits<float>::quiet_NaN();
      } else {
        sx[g] = m > 0.0f ? m / static_cast<float>(xmax) : 0.0f;
      }
      const double inv = sx[g] > 0.0f ? 1.0 / static_cast<double>(sx[g]) : 0.0;
#ifdef MQ_X86
      // Only the integer layouts come here, and every CPU that has one has AVX2.
      if (finite) {
        round_scaled_avx2(v + g * G_, G_, inv, xmax, X.data() + g * G_);
        continue;
      }
#endif
      for (int i = 0; i < G_; ++i) {
        // Round to nearest even by adding and removing 1.5 * 2^52 (|q| <= 2^23 + 1;
        // no libm call in this loop).
        constexpr double magic = 6755399441055744.0;
        const double q = finite ? (static_cast<double>(v[g * G_ + i]) * inv + magic) - magic : 0.0;
        X[g * G_ + i] = static_cast<int32_t>(std::clamp(q, -double(xmax), double(xmax)));
      }
    }
    float smax = 0.0f;
    for (int g = 0; g < cols_ / G_; ++g) {
      smax = sx[g] > smax ? sx[g] : smax; // NaN never compares greater
    }
    const float S = smax > 0.0f ? std::ldexp(1.0f, std::ilogb(smax) + 1) : 1.0f;
    for (int g = 0; g < cols_ / G_; ++g) {
      sx[g] /= S;
    }
    return S;
  }

  // A kernel's code order as a table, once per vector: src[r * n + j] is the block code
  // in element j of register r (R registers of n elements).
  template <typename F>
  static std::vector<int> code_order(int R, int n, F code_of) {
    std::vector<int> src(R * n);
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < n; ++j) {
        src[r * n + j] = code_of(r, j);
      }
    }
    return src;
  }

  // X (fixed_point) as int_xmax(nd) digits per block, most significant first, each
  // level as the VNNI kernel's registers in int_code_of order.
  float digits(const float* v, int8_t* xd, float* sx, int bits, int nd) const {
    const int R = int_regs(bits);
    const int bc = int_block_codes(bits);
    std::vector<int32_t> X;
    const float S = fixed_point(v, int_xmax(nd), sx, X);
    const std::vector<int> src =
        code_order(R, 64, [&](int r, int j) { return int_code_of(bits, r, j); });
    for (int b = 0; b < cols_ / bc; ++b) {
      for (int r = 0; r < R; ++r) {
        for (int j = 0; j < 64; ++j) {
          int32_t rest = X[b * bc + src[r * 64 + j]];
          // Balanced base-256 digits, least significant first.
          int8_t dg[3];
          for (int k = 0; k < nd; ++k) {
            const int32_t low = ((rest + 128) & 255) - 128;
            dg[k] = static_cast<int8_t>(low);
            rest = (rest - low) >> 8; // exact: rest - low is a multiple of 256
          }
          for (int k = 0; k < nd; ++k) {
            xd[((b * nd + k) * R + r) * 64 + j] = dg[nd - 1 - k];
          }
        }
      }
    }
    return S;
  }

  // X (fixed_point, |X| <= w16_xmax) as the AVX2 integer kernel's words: per block and
  // register (w16_code_of order) the levels, X itself or X >> L then X & (2^L - 1),
  // L = w16_lo_bits.
  float words(const float* v, int16_t* xw, float* sx, int bits, int levels) const {
    const int R = w16_regs(bits);
    const int bc = w16_block_codes(bits);
    std::vector<int32_t> X;
    const float S = fixed_point(v, w16_xmax(levels, bits), sx, X);
    const int lo = w16_lo_bits(bits);
    const std::vector<int> src =
        code_order(R, 16, [&](int r, int w) { return w16_code_of(bits, r, w); });
    for (int b = 0; b < cols_ / bc; ++b) {
      for (int r = 0; r < R; ++r) {
        int16_t* d = xw + (static_cast<std::size_t>(b) * R + r) * levels * 16;
        for (int w = 0; w < 16; ++w) {
          const int32_t q = X[b * bc + src[r * 16 + w]];
          if (levels == 1) {
            d[w] = static_cast<int16_t>(q);
          } else {
            d[w] = static_cast<int16_t>(q >> lo); // arithmetic: floor(q / 2^lo)
            d[16 + w] = static_cast<int16_t>(q & ((1 << lo) - 1));
          }
        }
      }
    }
    return S;
  }

  const float* x_;
  int cols_;
  int G_;
  std::size_t xps_; // floats per vector in xp_
  std::size_t xds_; // bytes per vector in xd_
  std::size_t xws_; // words per vector in xw_
  std::vector<float, LineAligned<float>> xp_;
  std::vector<float> gs_;
  std::vector<int8_t, LineAligned<int8_t>> xd_;
  std::vector<int16_t, LineAligned<int16_t>> xw_;
  std::vector<float> sx_;
  std::vector<float> sx_scale_;
};

template <typename S>
inline float to_f(S v) {
  return static_cast<float>(v);
}

template <>
inline float to_f(mx::bfloat16_t v) {
  // bf16 is the top half of a float32.
  uint16_t bits;
  std::memcpy(&bits, &v, 2);
  const uint32_t w = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

// Portable rows: a group's codes are decoded 8 at a time from B bytes (one 64-bit
// load of exactly B bytes, MLX's little-endian bitstream), then dotted with x.
template <int B, typename S>
void rows_scalar(const RowRun& r, int nrows, const Prep& p, int G, float* out, float*) {
  constexpr uint64_t mask = (uint64_t(1) << B) - 1;
  float q[128];
  for (int i = 0; i < nrows; ++i) {
    const S* s = static_cast<const S*>(r.s) + static_cast<std::size_t>(i) * r.ng;
    const S* b = static_cast<const S*>(r.b) + static_cast<std::size_t>(i) * r.ng;
    const uint8_t* w = r.w + i * r.row_bytes;
    float total = 0.0f;
    for (int g = 0; g < r.ng; ++g) {
      const uint8_t* pg = w + static_cast<std::size_t>(g) * G * B / 8;
      for (int c = 0; c < G / 8; ++c) {
        uint64_t v = 0;
        std::memcpy(&v, pg + c * B, B); // little-endian hosts (x86-64, arm64)
        for (int k = 0; k < 8; ++k) {
          q[8 * c + k] = static_cast<float>((v >> (B * k)) & mask);
        }
      }
      const float* xg = p.x + static_cast<std::size_t>(g) * G;
      float acc = 0.0f;
      for (int j = 0; j < G; ++j) {
        acc += xg[j] * q[j];
      }
      total += to_f(s[g]) * acc + to_f(b[g]) * p.gsum[g];
    }
    out[i] = total;
  }
}

template <typename S>
RowsFn scalar_bits(int bits) {
  return dispatch_bits(
      bits,
      [](auto b) -> RowsFn { return &rows_scalar<decltype(b)::value, S>; },
      []() -> RowsFn { throw std::invalid_argument("[moe_swiglu] unsupported bits"); });
}

RowsFn pick(const QMat& m, Layout L) {
  const SType st = m.sdtype == mx::float32 ? SType::f32
      : m.sdtype == mx::float16            ? SType::f16
                                           : SType::bf16;
#ifdef MQ_X86
  if (L.digits) {
    return rows_vnni(m.bits, st, L.digits);
  }
  if (L.levels) {
    return rows_avx2int(m.bits, st, L.levels);
  }
  if (L.lanes == 16) {
    return rows_avx512(m.bits, st);
  }
  if (L.lanes == 8) {
    return rows_avx2(m.bits, st);
  }
#endif
  switch (m.sdtype) {
    case mx::float32:
      return scalar_bits<float>(m.bits);
    case mx::float16:
      return scalar_bits<mx::float16_t>(m.bits);
    case mx::bfloat16:
      return scalar_bits<mx::bfloat16_t>(m.bits);
    default:
      throw std::invalid_argument("[moe_swiglu] unsupported scales dtype");
  }
}

// Rows starting at `row` of expert `e`.
RowRun run_of(const QMat& m, uint32_t e, int row) {
  const std::size_t row_bytes = static_cast<std::size_t>(m.cols) * m.bits / 8;
  const int ng = m.cols / m.group_size;
  const std::size_t ss = m.sdtype == mx::float32 ? 4 : 2;
  const std::size_t rr = static_cast<std::size_t>(e) * m.rows + row;
  return {
      m.w + rr * row_bytes,
      static_cast<const uint8_t*>(m.scales) + rr * ng * ss,
      static_cast<const uint8_t*>(m.biases) + rr * ng * ss,
      row_bytes,
      ng};
}

} // namespace

SafeIds::SafeIds(const uint32_t* idx, std::size_t T, int k, int experts) : idx_(idx) {
  for (std::size_t p = 0; p < T * k; ++p) {
    if (idx[p] >= static_cast<uint32_t>(experts)) {
      if (copy_.empty()) {
        copy_.assign(idx, idx + T * k);
      }
      copy_[p] = 0;
      if (bad_tokens_.empty() || bad_tokens_.back() != p / k) {
        bad_tokens_.push_back(p / k);
      }
    }
  }
}

void SafeIds::nan_rows(std::size_t cols, mx::Dtype dtype, void* y) const {
  if (bad_tokens_.empty()) {
    return;
  }
  const std::vector<float> nan(cols, std::numeric_limits<float>::quiet_NaN());
  for (std::size_t t : bad_tokens_) {
    store_floats(nan.data(), cols, dtype, static_cast<uint8_t*>(y) + t * cols * mx::size_of(dtype));
  }
}

namespace {

template <typename T>
void to_float(const void* src, std::size_t n, float* dst) {
  const T* s = static_cast<const T*>(src);
  for (std::size_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(s[i]);
  }
}

// bf16 is the top half of a float32: a shift the compiler vectorizes (MLX's
// conversion struct it does not), part of every bf16 call's serial x preparation.
template <>
void to_float<mx::bfloat16_t>(const void* src, std::size_t n, float* dst) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (std::size_t i = 0; i < n; ++i) {
    const uint32_t w = static_cast<uint32_t>(s[i]) << 16;
    std::memcpy(dst + i, &w, 4);
  }
}

template <typename T>
void store(const float* src, std::size_t n, void* dst) {
  T* d = static_cast<T*>(dst);
  for (std::size_t i = 0; i < n; ++i) {
    d[i] = static_cast<T>(src[i]);
  }
}

} // namespace

void load_floats(const void* src, mx::Dtype dtype, std::size_t n, float* dst) {
  switch (dtype) {
    case mx::float32:
      to_float<float>(src, n, dst);
      break;
    case mx::float16:
      to_float<mx::float16_t>(src, n, dst);
      break;
    case mx::bfloat16:
      to_float<mx::bfloat16_t>(src, n, dst);
      break;
    default:
      throw std::invalid_argument("[moe_swiglu] unsupported activation dtype");
  }
}

void store_floats(const float* src, std::size_t n, mx::Dtype dtype, void* dst) {
  switch (dtype) {
    case mx::float32:
      store<float>(src, n, dst);
      break;
    case mx::float16:
      store<mx::float16_t>(src, n, dst);
      break;
    case mx::bfloat16:
      store<mx::bfloat16_t>(src, n, dst);
      break;
    default:
      throw std::invalid_argument("[moe_swiglu] unsupported output dtype");
  }
}

const char* moe_cpu_path() {
  switch (current_path()) {
    case Path::avx512vnni:
      return "avx512vnni";
    case Path::avx512:
      return "avx512";
    case Path::avx2int:
      return "avx2int";
    case Path::avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

void moe_gate_up(const GateUpArgs& args) {
  const int D = args.gate.cols;
  const int I = args.gate.rows;
  const std::size_t n_pairs = args.T * args.k;
  if (n_pairs == 0) {
    return;
  }
  // A bad id's pairs compute expert 0; moe_down makes their tokens' rows NaN.
  const SafeIds safe(args.idx, args.T, args.k, args.gate.experts);
  GateUpArgs a = args;
  a.idx = safe.ids();
  const Path path = current_path();

  // x in float once per call; bf16/f16 activations are converted here only.
  std::vector<float> xf(a.T * D);
  load_floats(a.x, a.xdtype, xf.size(), xf.data());
  const Layout lg = layout_for(a.gate.bits, path, a.xdtype);
  const Layout lu = layout_for(a.up.bits, path, a.xdtype);
  const PrepBuf pg(xf.data(), a.T, D, a.gate.bits, a.gate.group_size, lg);
  // up usually has gate's layout (same bits and group size): one preparation then.
  const bool same = a.up.bits == a.gate.bits && a.up.group_size == a.gate.group_size;
  const std::optional<PrepBuf> pu_own = same
      ? std::nullopt
      : std::optional<PrepBuf>(std::in_place, xf.data(), a.T, D, a.up.bits, a.up.group_size, lu);
  const PrepBuf& pu = same ? pg : *pu_own;
  const RowsFn fg = pick(a.gate, lg);
  const RowsFn fu = pick(a.up, lu);

  // Work items: (pair, a chunk of rows of I); consecutive items share an expert. The
  // row kernels read a chunk as sequential streams (four in the integer kernels, two
  // in the float ones), which pays for long chunks: 128 rows here, 256 in down (of
  // 16/32, 64/64, 128/128, 256/256 and 128/256 rows, the fastest on a 2-core VM).
  constexpr int CH = 128;
  const std::size_t chunks = (I + CH - 1) / CH;
  const int scratch = row_scratch(D);
  dynamic_for(n_pairs * chunks, 8, [&](auto&& claim) {
    std::vector<float> sbuf(scratch);
    float g[CH], u[CH];
    claim([&](std::size_t i0, std::size_t i1) {
      for (std::size_t it = i0; it < i1; ++it) {
        const std::size_t p = it / chunks;
        const int i = static_cast<int>(CH * (it % chunks));
        const int nr = std::min(CH, I - i);
        const std::size_t t = p / a.k;
        const uint32_t e = a.idx[p];
        fg(run_of(a.gate, e, i), nr, pg.at(t), a.gate.group_size, g, sbuf.data());
        fu(run_of(a.up, e, i), nr, pu.at(t), a.up.group_size, u, sbuf.data());
        for (int j = 0; j < nr; ++j) {
          a.h[p * I + i + j] = silu(g[j]) * u[j];
        }
      }
    });
  });
}

void moe_down(const DownArgs& args) {
  const int D = args.down.rows;
  const int I = args.down.cols;
  const std::size_t n_pairs = args.T * args.k;
  if (args.T == 0) {
    return;
  }
  const SafeIds safe(args.idx, args.T, args.k, args.down.experts);
  DownArgs a = args;
  a.idx = safe.ids();
  const Path path = current_path();
  // h is float32; its digits follow the activations' precision (y has x's dtype).
  const Layout ld = layout_for(a.down.bits, path, a.ydtype);
  const PrepBuf ph(a.h, n_pairs, I, a.down.bits, a.down.group_size, ld);
  const RowsFn fd = pick(a.down, ld);

  // Like gate/up, work items are (pair, a chunk of rows of D), consecutive items on
  // one expert, so a thread streams long contiguous runs of one matrix; each pair's
  // rows go to o, and y[t] = sum_j scores[t, j] * o[t, j] in a fixed order after
  // (deterministic, whatever thread computed which rows). Tokens are taken in batches
  // that keep o at a few MB.
  constexpr int CH = 256;
  const std::size_t chunks = (D + CH - 1) / CH;
  const int scratch = row_scratch(I);
  const std::size_t tb =
      std::max<std::size_t>(1, (std::size_t(4) << 20) / (sizeof(float) * a.k * D));
  std::vector<float> o(std::min(a.T, tb) * a.k * D);
  for (std::size_t t0 = 0; t0 < a.T; t0 += tb) {
    const std::size_t t1 = std::min(a.T, t0 + tb);
    const std::size_t p0 = t0 * a.k;
    dynamic_for((t1 - t0) * a.k * chunks, 8, [&](auto&& claim) {
      std::vector<float> sbuf(scratch);
      claim([&](std::size_t i0, std::size_t i1) {
        for (std::size_t it = i0; it < i1; ++it) {
          const std::size_t p = p0 + it / chunks;
          const int d = static_cast<int>(CH * (it % chunks));
          const int nr = std::min(CH, D - d);
          float* out = o.data() + (p - p0) * D + d;
          fd(run_of(a.down, a.idx[p], d), nr, ph.at(p), a.down.group_size, out, sbuf.data());
        }
      });
    });
    dynamic_for(t1 - t0, 1, [&](auto&& claim) {
      std::vector<float> acc(D);
      claim([&](std::size_t i0, std::size_t i1) {
        for (std::size_t it = i0; it < i1; ++it) {
          const std::size_t t = t0 + it;
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int j = 0; j < a.k; ++j) {
            const std::size_t p = t * a.k + j;
            const float* op = o.data() + (p - p0) * D;
            for (int r = 0; r < D; ++r) {
              acc[r] += a.scores[p] * op[r];
            }
          }
          store_floats(
              acc.data(), D, a.ydtype, static_cast<uint8_t*>(a.y) + t * D * mx::size_of(a.ydtype));
        }
      });
    });
  }
  safe.nan_rows(D, a.ydtype, a.y);
}

void multi_rows(
    const float* x,
    std::size_t B,
    std::size_t T,
    const QMat& m,
    float* y,
    mx::Dtype act) {
  const int N = m.rows;
  const int K = m.cols;
  const std::size_t H = static_cast<std::size_t>(m.experts);
  if (B == 0 || T == 0 || N == 0 || H == 0) {
    return;
  }
  const Layout L = layout_for(m.bits, current_path(), act);
  const PrepBuf prep(x, B * H * T, K, m.bits, m.group_size, L);
  const RowsFn f = pick(m, L);
  // Chunks of rows: long (the row streams pay for length) but at least 8 per thread
  // over all heads, so two threads stay balanced on small layers; with several vectors,
  // about 192 KiB of rows, so the vectors after the first read them from L2.
  const std::size_t row_bytes = static_cast<std::size_t>(K) * m.bits / 8;
  const int threads = get_num_threads();
  const int64_t all_rows = static_cast<int64_t>(H) * N;
  int ch = static_cast<int>(std::clamp<int64_t>(all_rows / (8 * threads), 16, 256));
  if (B * T > 1) {
    ch = std::min<int>(
        ch,
        std::max<std::size_t>(16, (std::size_t(192) << 10) / std::max<std::size_t>(row_bytes, 1)));
  }
  ch = std::min((ch + 1) / 2 * 2, N);
  const std::size_t chunks = (N + ch - 1) / ch;
  const int scratch = row_scratch(K);
  // Items (head, chunk), a head's chunks consecutive: a claim streams one matrix.
  dynamic_for(H * chunks, 1, [&](auto&& claim) {
    std::vector<float> sbuf(scratch);
    claim([&](std::size_t i0, std::size_t i1) {
      for (std::size_t it = i0; it < i1; ++it) {
        const std::size_t h = it / chunks;
        const int r = static_cast<int>((it % chunks) * ch);
        const int nr = std::min(ch, N - r);
        const RowRun run = run_of(m, static_cast<uint32_t>(h), r);
        for (std::size_t b = 0; b < B; ++b) {
          for (std::size_t t = 0; t < T; ++t) {
            const std::size_t v = (b * H + h) * T + t;
            f(run, nr, prep.at(v), m.group_size, y + v * N + r, sbuf.data());
          }
        }
      }
    });
  });
}

} // namespace moequant::cpu
