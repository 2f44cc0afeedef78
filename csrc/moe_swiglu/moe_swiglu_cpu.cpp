// CPU twin of metal/moe_swiglu.h.
//
// Both phases are row dot products of quantized expert rows with one float vector
// (x for gate/up, the SwiGLU intermediate h for down), each weight byte read once.
// Per affine group, sum_i x_i (s q_i + b) = s * sum_i x_i q_i + b * sum_i x_i, so the
// group sums of the vector are computed once per vector and the inner loop is only
// sum_i x_i q_i.
//
// The AVX2 path reads a block of 8 lanes x 32 bits, lane l holding CPL consecutive
// codes (one 32-bit word for 2/4/8 bits; 3 bytes, spread out with one permute and
// one byte shuffle, for 3/6 bits). Code k of every lane is then isolated by one AND
// with a mask at its bit position, without a shift: its value is q * 2^(bits*k),
// exactly representable, and the vector was pre-permuted into the same lane order
// and pre-scaled by 2^-(bits*k) (exact), so the product equals x*q bit for bit. Only
// the top code of a full 32-bit lane is shifted down (it would read as negative).
// 5-bit rows and machines without AVX2 use the portable scalar path.
#include "moe_swiglu/moe_swiglu_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/thread_pool.h"
#include "mlx/types/half_types.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MQ_X86 1
#define MQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace moequant::cpu {

namespace mx = mlx::core;

namespace {

template <typename S>
inline float to_f(S v) {
  if constexpr (std::is_same_v<S, mx::bfloat16_t>) {
    // bf16 is the top half of a float32.
    uint16_t bits;
    std::memcpy(&bits, &v, 2);
    const uint32_t w = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  } else {
    return static_cast<float>(v);
  }
}

// SIMD block layout for `B` bits: 8 lanes, lane l holds CPL codes in NB bytes.
template <int B>
struct Layout {
  static constexpr bool simd = B != 5;
  static constexpr int NB = (B == 3 || B == 6) ? 3 : 4;
  static constexpr int CPL = simd ? NB * 8 / B : 8;
  static constexpr int BLK = 8 * CPL; // codes per block
  // The top code of a full 32-bit lane is shifted instead of masked.
  static constexpr bool shifted(int k) {
    return NB == 4 && k == CPL - 1;
  }
};

int layout_blk(int bits) {
  switch (bits) {
    case 2:
      return Layout<2>::BLK;
    case 3:
      return Layout<3>::BLK;
    case 4:
      return Layout<4>::BLK;
    case 6:
      return Layout<6>::BLK;
    case 8:
      return Layout<8>::BLK;
    default:
      return 0;
  }
}

// A vector prepared for one matrix layout: natural order, SIMD order, group sums.
struct Prep {
  const float* x;
  const float* xp; // null when the SIMD path is not used
  const float* gsum;
};

class PrepBuf {
 public:
  PrepBuf(const float* x, std::size_t n, int cols, int bits, int G, bool simd)
      : x_(x), cols_(cols), G_(G), xp_(simd ? n * cols : 0), gs_(n * (cols / G)) {
    const int blk = simd ? layout_blk(bits) : 0;
    const int cpl = blk / 8;
    const int nb = (bits == 3 || bits == 6) ? 3 : 4;
    for (std::size_t t = 0; t < n; ++t) {
      const float* v = x + t * cols;
      float* gs = gs_.data() + t * (cols / G);
      for (int g = 0; g < cols / G; ++g) {
        float s = 0.0f;
        for (int i = 0; i < G; ++i) {
          s += v[g * G + i];
        }
        gs[g] = s;
      }
      if (!simd) {
        continue;
      }
      float* xp = xp_.data() + t * cols;
      const int nblk = cols / blk;
      for (int b = 0; b < nblk; ++b) {
        for (int k = 0; k < cpl; ++k) {
          const bool shifted = nb == 4 && k == cpl - 1;
          // 2^-(bits*k), exact; bits*k <= 28.
          const float scale = shifted ? 1.0f : 1.0f / static_cast<float>(1u << (bits * k));
          for (int l = 0; l < 8; ++l) {
            xp[b * blk + 8 * k + l] = v[b * blk + l * cpl + k] * scale;
          }
        }
      }
    }
  }
  Prep at(std::size_t t) const {
    return {
        x_ + t * cols_,
        xp_.empty() ? nullptr : xp_.data() + t * cols_,
        gs_.data() + t * (cols_ / G_)};
  }

 private:
  const float* x_;
  int cols_;
  int G_;
  std::vector<float> xp_;
  std::vector<float> gs_;
};

// A run of consecutive rows of one expert matrix.
struct RowRun {
  const uint8_t* w; // first row
  const void* s;
  const void* b;
  std::size_t row_bytes;
  int ng; // groups per row (= scales per row)
};

// Portable path: a group's codes are decoded 8 at a time from B bytes (one 64-bit
// load of exactly B bytes, MLX's little-endian bitstream), then dotted with x.
template <int B, typename S>
float dot_groups_scalar(const uint8_t* w, const S* s, const float* x, int g0, int g1, int G) {
  constexpr uint64_t mask = (uint64_t(1) << B) - 1;
  float q[128];
  float total = 0.0f;
  for (int g = g0; g < g1; ++g) {
    const uint8_t* p = w + static_cast<std::size_t>(g) * G * B / 8;
    for (int c = 0; c < G / 8; ++c) {
      uint64_t v = 0;
      std::memcpy(&v, p + c * B, B); // little-endian hosts (x86-64, arm64)
      for (int k = 0; k < 8; ++k) {
        q[8 * c + k] = static_cast<float>((v >> (B * k)) & mask);
      }
    }
    const float* xg = x + static_cast<std::size_t>(g) * G;
    float acc = 0.0f;
    for (int i = 0; i < G; ++i) {
      acc += xg[i] * q[i];
    }
    total += to_f(s[g]) * acc;
  }
  return total;
}

template <int B, typename S>
void rows_scalar(const RowRun& r, int nrows, const Prep& p, int G, float* out, float*) {
  for (int i = 0; i < nrows; ++i) {
    const S* s = static_cast<const S*>(r.s) + static_cast<std::size_t>(i) * r.ng;
    const S* b = static_cast<const S*>(r.b) + static_cast<std::size_t>(i) * r.ng;
    float bt = 0.0f;
    for (int g = 0; g < r.ng; ++g) {
      bt += to_f(b[g]) * p.gsum[g];
    }
    out[i] = dot_groups_scalar<B, S>(r.w + i * r.row_bytes, s, p.x, 0, r.ng, G) + bt;
  }
}

#ifdef MQ_X86
#define MQ_AVX2_INLINE MQ_AVX2 __attribute__((always_inline)) inline
#ifndef MQ_PREFETCH
#define MQ_PREFETCH 1024
#endif

template <int B>
MQ_AVX2_INLINE __m256i load_block(const uint8_t* p) {
  if constexpr (Layout<B>::NB == 4) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {
    // 24 bytes; the masked load never touches memory past them.
    const __m256i m6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    __m256i v = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), m6);
    // Bytes 0..15 to the low half, 12..27 to the high half, then 3 bytes per lane.
    v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 1, 2, 3, 3, 4, 5, 6));
    const __m256i sh = _mm256_setr_epi8(
        0, 1, 2, -128, 3, 4, 5, -128, 6, 7, 8, -128, 9, 10, 11, -128,
        0, 1, 2, -128, 3, 4, 5, -128, 6, 7, 8, -128, 9, 10, 11, -128);
    return _mm256_shuffle_epi8(v, sh);
  }
}

MQ_AVX2_INLINE float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// Eight scales or biases as floats. bf16 widens by a shift; f16 uses F16C.
template <typename S>
MQ_AVX2_INLINE __m256 load8(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<S, mx::bfloat16_t>) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// NR rows starting at row `i` of the run, sharing the vector loads.
template <int B, typename S, int NR>
MQ_AVX2_INLINE void rows_body(
    const RowRun& r, int i, const Prep& p, int cols, int G, float* out, float* sbuf) {
  using L = Layout<B>;
  const int ng = r.ng;
  const int nblk = cols / L::BLK;
  const uint8_t* w[NR];
  const float* sf[NR];
  float bias_term[NR];
  // Scales in float (padded so a block can load 8 of them) and the bias term
  // sum_g b_g * gsum_g, in one vector pass over the row's groups.
  for (int j = 0; j < NR; ++j) {
    const std::size_t row = static_cast<std::size_t>(i + j);
    w[j] = r.w + row * r.row_bytes;
    float* d = sbuf + j * (ng + 8);
    const S* s = static_cast<const S*>(r.s) + row * ng;
    const S* b = static_cast<const S*>(r.b) + row * ng;
    __m256 bacc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= ng; g += 8) {
      _mm256_storeu_ps(d + g, load8(s + g));
      bacc = _mm256_fmadd_ps(load8(b + g), _mm256_loadu_ps(p.gsum + g), bacc);
    }
    float bt = hsum(bacc);
    for (; g < ng; ++g) {
      d[g] = to_f(s[g]);
      bt += to_f(b[g]) * p.gsum[g];
    }
    _mm256_storeu_ps(d + ng, _mm256_setzero_ps());
    sf[j] = d;
    bias_term[j] = bt;
  }
  // Blocks wider than a group (BLK = 64 or 128 codes, G = 32 or 64) take one scale
  // per 4 or 2 lanes; otherwise the block lies in one group.
  const int gpb = L::BLK > G ? L::BLK / G : 1;
  const __m256i lane_group = gpb == 4 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                                      : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 tot[NR];
  for (int j = 0; j < NR; ++j) {
    tot[j] = _mm256_setzero_ps();
  }
  for (int blk = 0; blk < nblk; ++blk) {
    __m256i v[NR];
    for (int j = 0; j < NR; ++j) {
      const uint8_t* wb = w[j] + static_cast<std::size_t>(blk) * 8 * L::NB;
      // One decode thread cannot keep enough misses in flight through the hardware
      // prefetcher alone (it stops at page boundaries): prefetch ahead in the run,
      // whose rows are contiguous.
      _mm_prefetch(reinterpret_cast<const char*>(wb + MQ_PREFETCH), _MM_HINT_T0);
      v[j] = load_block<B>(wb);
    }
    const float* xb = p.xp + static_cast<std::size_t>(blk) * L::BLK;
    __m256 acc[NR];
    for (int j = 0; j < NR; ++j) {
      acc[j] = _mm256_setzero_ps();
    }
#pragma GCC unroll 16
    for (int k = 0; k < L::CPL; ++k) {
      const __m256 xk = _mm256_loadu_ps(xb + 8 * k);
      const __m256i m = _mm256_set1_epi32(((1 << B) - 1) << (B * k));
      for (int j = 0; j < NR; ++j) {
        const __m256i c = L::shifted(k) ? _mm256_srli_epi32(v[j], B * k)
                                        : _mm256_and_si256(v[j], m);
        acc[j] = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(c), acc[j]);
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m256 sv = gpb == 1
          ? _mm256_broadcast_ss(sf[j] + (blk * L::BLK) / G)
          : _mm256_permutevar8x32_ps(_mm256_loadu_ps(sf[j] + blk * gpb), lane_group);
      tot[j] = _mm256_fmadd_ps(sv, acc[j], tot[j]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    out[j] = hsum(tot[j]) + bias_term[j];
  }
  // A tail shorter than a block (cols not a multiple of BLK) starts on a group
  // boundary, since BLK > G there.
  const int g_tail = (nblk * L::BLK) / G;
  if (g_tail < ng) {
    for (int j = 0; j < NR; ++j) {
      const S* s = static_cast<const S*>(r.s) + static_cast<std::size_t>(i + j) * ng;
      out[j] += dot_groups_scalar<B, S>(w[j], s, p.x, g_tail, ng, G);
    }
  }
}

// Rows in pairs (sharing the vector loads), then a last odd row.
template <int B, typename S>
MQ_AVX2 void rows_avx2(const RowRun& r, int nrows, const Prep& p, int G, float* out, float* sbuf) {
  const int cols = r.ng * G;
  int i = 0;
  for (; i + 2 <= nrows; i += 2) {
    rows_body<B, S, 2>(r, i, p, cols, G, out + i, sbuf);
  }
  if (i < nrows) {
    rows_body<B, S, 1>(r, i, p, cols, G, out + i, sbuf);
  }
}
#endif

bool avx2_supported() {
#ifdef MQ_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// MOEQUANT_CPU_PATH=scalar forces the portable path (read per call, for tests).
bool use_simd() {
  const char* e = std::getenv("MOEQUANT_CPU_PATH");
  if (e && std::string(e) == "scalar") {
    return false;
  }
  return avx2_supported();
}

// Computes nrows consecutive rows; `scratch` holds 2 * (groups per row + 8) floats.
using RowsFn = void (*)(const RowRun&, int, const Prep&, int, float*, float*);

template <int B, typename S>
RowsFn pick_impl(bool simd) {
#ifdef MQ_X86
  if constexpr (Layout<B>::simd) {
    if (simd) {
      return &rows_avx2<B, S>;
    }
  }
#endif
  (void)simd;
  return &rows_scalar<B, S>;
}

template <typename S>
RowsFn pick_bits(int bits, bool simd) {
  switch (bits) {
    case 2:
      return pick_impl<2, S>(simd);
    case 3:
      return pick_impl<3, S>(simd);
    case 4:
      return pick_impl<4, S>(simd);
    case 5:
      return pick_impl<5, S>(simd);
    case 6:
      return pick_impl<6, S>(simd);
    case 8:
      return pick_impl<8, S>(simd);
    default:
      throw std::invalid_argument("[moe_swiglu] unsupported bits");
  }
}

RowsFn pick(const QMat& m, bool simd) {
  switch (m.sdtype) {
    case mx::float32:
      return pick_bits<float>(m.bits, simd);
    case mx::float16:
      return pick_bits<mx::float16_t>(m.bits, simd);
    case mx::bfloat16:
      return pick_bits<mx::bfloat16_t>(m.bits, simd);
    default:
      throw std::invalid_argument("[moe_swiglu] unsupported scales dtype");
  }
}

// The matrix's layout gets the SIMD path when the bit width has one.
bool simd_for(const QMat& m, bool simd) {
  return simd && m.bits != 5;
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

void check_ids(const uint32_t* idx, std::size_t n, int experts) {
  for (std::size_t i = 0; i < n; ++i) {
    if (idx[i] >= static_cast<uint32_t>(experts)) {
      throw std::out_of_range(
          "[moequant.moe_swiglu] expert id " + std::to_string(static_cast<int32_t>(idx[i])) +
          " is out of range for " + std::to_string(experts) + " experts.");
    }
  }
}

template <typename T>
void to_float(const void* src, std::size_t n, float* dst) {
  const T* s = static_cast<const T*>(src);
  for (std::size_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(s[i]);
  }
}

template <typename T>
void store(const float* src, std::size_t n, void* dst) {
  T* d = static_cast<T*>(dst);
  for (std::size_t i = 0; i < n; ++i) {
    d[i] = static_cast<T>(src[i]);
  }
}

// Work items are claimed `grain` at a time from a shared counter, so a thread that
// the OS deschedules (the machine may be shared) delays only the items it holds.
template <typename F>
void dynamic_for(std::size_t n, std::size_t grain, F&& fn) {
  std::atomic<std::size_t> next{0};
  const std::size_t tasks = std::min<std::size_t>(
      static_cast<std::size_t>(get_num_threads()), (n + grain - 1) / grain);
  parallel_for(tasks, 1, [&](std::size_t, std::size_t) {
    fn([&](auto&& body) {
      for (;;) {
        const std::size_t b = next.fetch_add(grain);
        if (b >= n) {
          break;
        }
        body(b, std::min(n, b + grain));
      }
    });
  });
}

inline float silu(float g) {
  return g / (1.0f + std::exp(-g));
}

} // namespace

const char* moe_cpu_path() {
  return use_simd() ? "avx2" : "scalar";
}

void moe_gate_up(const GateUpArgs& a) {
  const int D = a.gate.cols;
  const int I = a.gate.rows;
  const std::size_t n_pairs = a.T * a.k;
  if (n_pairs == 0) {
    return;
  }
  check_ids(a.idx, n_pairs, a.gate.experts);
  const bool simd = use_simd();

  // x in float once per call; bf16/f16 activations are converted here only.
  std::vector<float> xf(a.T * D);
  switch (a.xdtype) {
    case mx::float32:
      to_float<float>(a.x, xf.size(), xf.data());
      break;
    case mx::float16:
      to_float<mx::float16_t>(a.x, xf.size(), xf.data());
      break;
    case mx::bfloat16:
      to_float<mx::bfloat16_t>(a.x, xf.size(), xf.data());
      break;
    default:
      throw std::invalid_argument("[moe_swiglu] unsupported x dtype");
  }
  const PrepBuf pg(xf.data(), a.T, D, a.gate.bits, a.gate.group_size, simd_for(a.gate, simd));
  const PrepBuf pu(xf.data(), a.T, D, a.up.bits, a.up.group_size, simd_for(a.up, simd));
  const RowsFn fg = pick(a.gate, simd);
  const RowsFn fu = pick(a.up, simd);

  // Work items: (pair, a chunk of rows of I); consecutive items share an expert.
  constexpr int CH = 16;
  const std::size_t chunks = (I + CH - 1) / CH;
  const int scratch = 2 * (D / std::min(a.gate.group_size, a.up.group_size) + 8);
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

void moe_down(const DownArgs& a) {
  const int D = a.down.rows;
  const int I = a.down.cols;
  const std::size_t n_pairs = a.T * a.k;
  if (a.T == 0) {
    return;
  }
  check_ids(a.idx, n_pairs, a.down.experts);
  const bool simd = use_simd();
  const PrepBuf ph(
      a.h, n_pairs, I, a.down.bits, a.down.group_size, simd_for(a.down, simd));
  const RowsFn fd = pick(a.down, simd);

  // Work items: (token, a chunk of rows of D). Within a chunk the k experts are
  // streamed one after the other, so only two weight rows are read at a time.
  constexpr int CH = 32;
  const std::size_t chunks = (D + CH - 1) / CH;
  const int scratch = 2 * (I / a.down.group_size + 8);
  dynamic_for(a.T * chunks, 4, [&](auto&& claim) {
    std::vector<float> sbuf(scratch);
    float acc[CH], o[CH];
    claim([&](std::size_t i0, std::size_t i1) {
    for (std::size_t it = i0; it < i1; ++it) {
      const std::size_t t = it / chunks;
      const int d = static_cast<int>(CH * (it % chunks));
      const int nr = std::min(CH, D - d);
      std::fill(acc, acc + nr, 0.0f);
      for (int j = 0; j < a.k; ++j) {
        const std::size_t p = t * a.k + j;
        fd(run_of(a.down, a.idx[p], d), nr, ph.at(p), a.down.group_size, o, sbuf.data());
        for (int r = 0; r < nr; ++r) {
          acc[r] += a.scores[p] * o[r];
        }
      }
      const std::size_t off = t * D + d;
      switch (a.ydtype) {
        case mx::float32:
          store<float>(acc, nr, static_cast<float*>(a.y) + off);
          break;
        case mx::float16:
          store<mx::float16_t>(acc, nr, static_cast<mx::float16_t*>(a.y) + off);
          break;
        case mx::bfloat16:
          store<mx::bfloat16_t>(acc, nr, static_cast<mx::bfloat16_t*>(a.y) + off);
          break;
        default:
          throw std::invalid_argument("[moe_swiglu] unsupported output dtype");
      }
    }
    });
  });
}

} // namespace moequant::cpu
