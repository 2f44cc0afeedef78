// Kernels that exercise what the project's own kernels do not yet: threadgroup
// memory, barriers, simd collectives, vectors. The harness tests mutate them to show
// that the emulator catches the bugs these constructs invite.
#include <metal_stdlib>

using namespace metal;

// out[tg] = sum of the threadgroup's slice of x: simd_sum per simdgroup, partial
// sums through threadgroup memory, a second simd_sum in the first simdgroup.
template <typename T>
[[kernel]] void tg_sum(
    const device T* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint gid [[thread_position_in_grid]],
    uint tg [[threadgroup_position_in_grid]],
    ushort lid [[thread_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort sgid [[simdgroup_index_in_threadgroup]],
    ushort n_sg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  float v = gid < n ? float(x[gid]) : 0.0f;
  v = simd_sum(v);
  if (lane == 0) {
    partial[sgid] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sgid == 0) {
    float p = lid < n_sg ? partial[lid] : 0.0f;
    p = simd_sum(p);
    if (lid == 0) {
      out[tg] = p;
    }
  }
}

template [[host_name("tg_sum_float")]] [[kernel]] decltype(tg_sum<float>) tg_sum<float>;
template [[host_name("tg_sum_half")]] [[kernel]] decltype(tg_sum<half>) tg_sum<half>;

// Each lane writes what every collective returns, so the tests can check them all.
// out has 12 floats per thread.
[[kernel]] void collectives(
    const device float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const float v = x[gid];
  device float* o = out + gid * 12;
  o[0] = simd_sum(v);
  o[1] = simd_max(v);
  o[2] = simd_min(v);
  o[3] = simd_shuffle_down(v, 3);
  o[4] = simd_shuffle_up(v, 2);
  o[5] = simd_shuffle_xor(v, 5);
  o[6] = simd_broadcast(v, 7);
  o[7] = simd_shuffle(v, ushort(31 - lane));
  o[8] = simd_prefix_exclusive_sum(v);
  o[9] = simd_prefix_inclusive_sum(v);
  o[10] = float(simd_all(v > 0.0f)) + 2.0f * float(simd_any(v > 0.5f));
  // A shuffle-down ladder: lane 0 ends with the sum of the simdgroup.
  float s = v;
  for (ushort d = 16; d > 0; d /= 2) {
    s += simd_shuffle_down(s, d);
  }
  o[11] = s;
}

// A 2D grid with vector builtins, vector loads and a few shim functions.
// in: float4 per element (rows x cols), out: 4 floats per element.
[[kernel]] void vec_ops(
    const device float4* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint2& shape [[buffer(2)]],
    uint2 pos [[thread_position_in_grid]]) {
  if (pos.x >= shape.y || pos.y >= shape.x) {
    return;
  }
  const uint i = pos.y * shape.y + pos.x;
  const float4 a = in[i];
  const half4 h = half4(a);
  const float2 lo = a.xy;
  const float4 b = float4(lo, a.zw);
  const float4 c = select(b, -b, a < 0.0f);  // |a|
  device float* o = out + i * 4;
  o[0] = dot(c, float4(1.0f));
  o[1] = clamp(a.x, -0.5f, 0.5f);
  o[2] = as_type<float>(as_type<uint>(a.y) ^ 0x80000000u);  // -a.y
  o[3] = float(h.w) + max(a.z, a.w);
}

// Threadgroup memory sized by the host ([[threadgroup(0)]]); reverses each
// threadgroup's slice of x.
[[kernel]] void tg_reverse(
    const device float* x [[buffer(0)]],
    device float* y [[buffer(1)]],
    threadgroup float* buf [[threadgroup(0)]],
    uint gid [[thread_position_in_grid]],
    uint lid [[thread_position_in_threadgroup]],
    uint ntg [[threads_per_threadgroup]]) {
  buf[lid] = x[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[gid] = buf[ntg - 1 - lid];
}

// 9000 floats: over Metal's 32 KB of threadgroup memory.
[[kernel]] void tg_too_big(device float* y [[buffer(0)]], uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float big[9000];
  big[lid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = big[lid];
}

// Conversions that must round to nearest even; also the `kernel` keyword spelling
// and half literals.
kernel void convert(
    const device float* x [[buffer(0)]],
    device bfloat* b [[buffer(1)]],
    device half* h [[buffer(2)]],
    uint i [[thread_position_in_grid]]) {
  b[i] = bfloat(x[i]);
  h[i] = half(x[i]) * 1.0h;
}

// ---- an MLX-style 4-bit GEMV (y = W x): the constructs the MoE kernels will use ------
#define MQ_FUNC inline __attribute__((always_inline))
#define MQ_CONST static constant constexpr const

// x chunk of one lane, as float; returns its sum for the bias term.
template <typename T, int V>
MQ_FUNC float load_x(const device T* x, thread float* xs) {
  float sum = 0.0f;
#pragma clang loop unroll(full)
  for (int i = 0; i < V; ++i) {
    xs[i] = float(x[i]);
    sum += xs[i];
  }
  return sum;
}

// Dot product of V/2 packed bytes (two 4-bit codes each) with the x chunk.
template <int V>
MQ_FUNC float qdot(const device uint8_t* wb, thread const float* xs, float xsum, float s,
                   float b) {
  float acc = 0.0f;
  for (int i = 0; i < V / 2; ++i) {
    const uint8_t byte = wb[i];
    acc += xs[2 * i] * float(byte & 0x0f) + xs[2 * i + 1] * float(byte >> 4);
  }
  return s * acc + b * xsum;
}

// Threadgroups of (32, 2, 1): each simdgroup computes 4 rows, each lane 8 values of K
// per step. Needs K % 256 == 0 and N % 8 == 0.
template <typename T, int G>
[[kernel]] void qmv4(
    const device uint32_t* w [[buffer(0)]],
    const device T* scales [[buffer(1)]],
    const device T* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant int& K [[buffer(5)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint sgid [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  MQ_CONST int rows = 4;
  MQ_CONST int vals = 8;
  MQ_CONST int block = 32 * vals;
  const int row0 = (tid.y * 2 + sgid) * rows;
  float xs[vals];
  float result[rows] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k0 = 0; k0 < K; k0 += block) {
    const int k = k0 + int(lane) * vals;
    const float xsum = load_x<T, vals>(x + k, xs);
    for (int r = 0; r < rows; ++r) {
      const int row = row0 + r;
      const device uint8_t* wb = (const device uint8_t*)(w + (row * K + k) / 8);
      const float s = float(scales[row * (K / G) + k / G]);
      const float b = float(biases[row * (K / G) + k / G]);
      result[r] += qdot<vals>(wb, xs, xsum, s, b);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float total = simd_sum(result[r]);
    if (lane == 0) {
      y[row0 + r] = static_cast<T>(total);
    }
  }
}

template [[host_name("qmv4_float_g64")]] [[kernel]] decltype(qmv4<float, 64>) qmv4<float, 64>;
template [[host_name("qmv4_half_g32")]] [[kernel]] decltype(qmv4<half, 32>) qmv4<half, 32>;
template [[host_name("qmv4_bfloat_g128")]] [[kernel]] decltype(qmv4<bfloat, 128>) qmv4<bfloat, 128>;
