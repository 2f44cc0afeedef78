// Rows -> groups of slots -> mq_fit_group -> MLX's bitstream, for one fit backend.
// Included inside an anonymous namespace by each path's .cpp (fit_cpu.cpp,
// fit_avx2.cpp), so that no inline code compiled for AVX2 can be merged by the linker
// into the baseline path.
//
// Needs: FitArgs, mq_fit_group (requantize_fit.h), the backend template B<T> and the
// row helpers H (INT4 nibble counts and codes; mq_rows_scalar below or a SIMD twin).

template <typename T>
struct cpu_tbits;
template <>
struct cpu_tbits<float> {
  static uint32_t get(float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    return b;
  }
  static float put(uint32_t b) {
    float x;
    std::memcpy(&x, &b, 4);
    return x;
  }
  static uint32_t sign() {
    return 0x80000000u;
  }
};
template <>
struct cpu_tbits<mlx::core::float16_t> {
  static uint32_t get(float x) {
    return mlx::core::float16_t(x).bits_;
  }
  static float put(uint32_t b) {
    mlx::core::float16_t h;
    h.bits_ = static_cast<uint16_t>(b);
    return static_cast<float>(h);
  }
  static uint32_t sign() {
    return 0x8000u;
  }
};
template <>
struct cpu_tbits<mlx::core::bfloat16_t> {
  static uint32_t get(float x) {
    return cpu_tbits<float>::get(x) >> 16;
  }
  static float put(uint32_t b) {
    return cpu_tbits<float>::put(b << 16);
  }
  static uint32_t sign() {
    return 0x8000u;
  }
};

// Codes (bytes < 2^bits, n a multiple of 8) -> MLX's little-endian bitstream.
template <int BITS>
void pack_codes_b(const uint8_t* q, int n, uint8_t* dst) {
  for (int i = 0; i < n; i += 8) {
    mq_u64 x;
    std::memcpy(&x, q + i, 8);
    x = mq_pack8<BITS>(x);
    std::memcpy(dst + BITS * (i / 8), &x, BITS); // little-endian hosts (x86, arm64)
  }
}

inline void pack_codes(const uint8_t* q, int n, int bits, uint8_t* dst) {
  switch (bits) {
    case 2:
      return pack_codes_b<2>(q, n, dst);
    case 3:
      return pack_codes_b<3>(q, n, dst);
    case 4:
      return pack_codes_b<4>(q, n, dst);
    case 5:
      return pack_codes_b<5>(q, n, dst);
    case 6:
      return pack_codes_b<6>(q, n, dst);
    default:
      return pack_codes_b<8>(q, n, dst);
  }
}

// Row helpers of the INT4 input, scalar: the count of each nibble among a block's 32,
// and a block's 32 output codes (codes of the block's 16 slot values v, picked by nibble).
struct mq_rows_scalar {
  static void counts(const uint8_t* in, int* cnt) {
    for (int u = 0; u < 16; ++u) {
      cnt[u] = 0;
    }
    for (int k = 0; k < 16; ++k) {
      cnt[in[k] & 0x0F] += 1;
      cnt[in[k] >> 4] += 1;
    }
  }
  static void
  codes(const mq_fit_result& r, const float* v, float nb, const uint8_t* in, uint8_t* out) {
    uint8_t lut[16];
    for (int u = 0; u < 16; ++u) {
      lut[u] = static_cast<uint8_t>(mq_fit_code(r, v[u], nb));
    }
    for (int k = 0; k < 16; ++k) {
      out[2 * k] = lut[in[k] & 0x0F];
      out[2 * k + 1] = lut[in[k] >> 4];
    }
  }
};

template <typename SrcT, typename OutT, template <typename> class B, class H>
void fit_groups_impl(const FitArgs& a, bool int4, std::size_t g0, std::size_t g1) {
  const int G = a.group_size;
  const int gpr = a.K / G;
  const float nb = static_cast<float>((1 << a.bits) - 1);
  mq_fit_slots s;
  bool present[MQ_FIT_MAX_SLOTS];
  uint8_t codes[MQ_FIT_MAX_SLOTS];
  for (std::size_t gi = g0; gi < g1; ++gi) {
    const std::size_t row = gi / gpr;
    const int g = static_cast<int>(gi % gpr);
    const float* h = a.importance ? a.importance + static_cast<std::size_t>(g) * G : nullptr;
    if (int4) {
      // Slot 16 b + u: nibble u of block b (32 weights); weights summed in channel order.
      const int nblk = G / 32;
      const int n_src = a.K / a.src_group_size;
      const uint8_t* in = a.packed + row * (static_cast<std::size_t>(a.K) / 2) +
          static_cast<std::size_t>(g) * G / 2;
      const SrcT* ss = static_cast<const SrcT*>(a.src_scales) + row * n_src;
      s.n = 16 * nblk;
      for (int b = 0; b < nblk; ++b) {
        const float sc = static_cast<float>(ss[(g * G + 32 * b) / a.src_group_size]);
        int cnt[16];
        H::counts(in + 16 * b, cnt);
        float c[16];
        if (a.unit_importance) {
          // The channel-order sum of cnt ones is exactly cnt (integers below 2^24).
          for (int u = 0; u < 16; ++u) {
            c[u] = static_cast<float>(cnt[u]);
          }
        } else {
          for (int u = 0; u < 16; ++u) {
            c[u] = 0.0f;
          }
          for (int k = 0; k < 32; ++k) {
            const uint8_t byte = in[16 * b + k / 2];
            const int u = (k & 1) ? (byte >> 4) : (byte & 0x0F);
            c[u] = c[u] + (h ? h[32 * b + k] : 1.0f);
          }
        }
        for (int u = 0; u < 16; ++u) {
          s.v[16 * b + u] = static_cast<float>(u - MQ_INT4_OFFSET) * sc;
          s.c[16 * b + u] = c[u];
          present[16 * b + u] = cnt[u] > 0;
        }
      }
    } else {
      const SrcT* w = static_cast<const SrcT*>(a.w) + row * a.K + static_cast<std::size_t>(g) * G;
      s.n = G;
      for (int j = 0; j < G; ++j) {
        s.v[j] = static_cast<float>(w[j]);
        s.c[j] = h ? h[j] : 1.0f;
        present[j] = true;
      }
    }
    const mq_fit_result r = mq_fit_group<OutT, cpu_tbits<OutT>, B<OutT>>(s, present, a.bits);
    static_cast<OutT*>(a.scales)[gi] = static_cast<OutT>(r.scale);
    static_cast<OutT*>(a.biases)[gi] = static_cast<OutT>(r.bias);
    uint8_t* out = a.wq + gi * (static_cast<std::size_t>(G) * a.bits / 8);
    if (int4) {
      const uint8_t* in = a.packed + row * (static_cast<std::size_t>(a.K) / 2) +
          static_cast<std::size_t>(g) * G / 2;
      for (int b = 0; b < G / 32; ++b) {
        H::codes(r, s.v + 16 * b, nb, in + 16 * b, codes + 32 * b);
      }
    } else {
      for (int j = 0; j < G; ++j) {
        codes[j] = static_cast<uint8_t>(mq_fit_code(r, s.v[j], nb));
      }
    }
    pack_codes(codes, G, a.bits, out);
  }
}

template <template <typename> class B, class H, typename SrcT>
void fit_groups_out(const FitArgs& a, bool int4, std::size_t g0, std::size_t g1) {
  switch (a.out_dtype) {
    case mlx::core::float32:
      return fit_groups_impl<SrcT, float, B, H>(a, int4, g0, g1);
    case mlx::core::float16:
      return fit_groups_impl<SrcT, mlx::core::float16_t, B, H>(a, int4, g0, g1);
    default:
      return fit_groups_impl<SrcT, mlx::core::bfloat16_t, B, H>(a, int4, g0, g1);
  }
}

template <template <typename> class B, class H>
void fit_groups_dispatch(const FitArgs& a, bool int4, std::size_t g0, std::size_t g1) {
  switch (a.src_dtype) {
    case mlx::core::float32:
      return fit_groups_out<B, H, float>(a, int4, g0, g1);
    case mlx::core::float16:
      return fit_groups_out<B, H, mlx::core::float16_t>(a, int4, g0, g1);
    default:
      return fit_groups_out<B, H, mlx::core::bfloat16_t>(a, int4, g0, g1);
  }
}
