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
