#include "moe_swiglu/moe_swiglu.h"

#include <limits>
#include <sstream>
#include <stdexcept>

#include "common/checks.h"
#include "common/cpu_task.h"
#include "common/strided.h"
#include "mlx/backend/cpu/encoder.h"
#include "moe_swiglu/moe_swiglu_cpu.h"
#include "moe_swiglu_launch.h"

namespace moequant {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[moequant.moe_swiglu] " + msg);
}

// Checks one projection: weight (E, rows, cols*bits/32) uint32, scales and biases
// (E, rows, cols/group_size) of one float dtype. Returns E.
int check_proj(const char* name, const QuantProj& p, int rows, int cols, int experts) {
  std::string n(name);
  check_bits_group("[moequant.moe_swiglu] " + n + ": ", p.bits, p.group_size);
  if (p.weight.dtype() != mx::uint32) {
    fail(n + ": weight must be uint32 (packed codes); got " + dtype_str(p.weight.dtype()) + ".");
  }
  if (p.weight.ndim() != 3) {
    fail(
        n + ": weight must be (experts, out, in*bits/32); got shape " +
        shape_str(p.weight.shape()) + ".");
  }
  if (!is_float(p.scales.dtype()) || p.biases.dtype() != p.scales.dtype()) {
    fail(
        n + ": scales and biases must share one float dtype; got " + dtype_str(p.scales.dtype()) +
        " and " + dtype_str(p.biases.dtype()) + ".");
  }
  if (cols % p.group_size != 0) {
    fail(
        n + ": its input size " + std::to_string(cols) + " is not divisible by group_size " +
        std::to_string(p.group_size) + ".");
  }
  const int E = experts > 0 ? experts : p.weight.shape(0);
  const mx::Shape want_w{E, rows, cols / 32 * p.bits};
  const mx::Shape want_s{E, rows, cols / p.group_size};
  if (p.weight.shape() != want_w) {
    fail(
        n + ": weight must have shape " + shape_str(want_w) + " for " + std::to_string(p.bits) +
        "-bit codes; got " + shape_str(p.weight.shape()) + ".");
  }
  if (p.scales.shape() != want_s || p.biases.shape() != want_s) {
    fail(
        n + ": scales and biases must have shape " + shape_str(want_s) + "; got " +
        shape_str(p.scales.shape()) + " and " + shape_str(p.biases.shape()) + ".");
  }
  return E;
}

cpu::QMat qmat(const mx::array& w, const mx::array& s, const mx::array& b, ProjParams pp) {
  cpu::QMat m;
  m.w = w.data<uint8_t>();
  m.scales = s.data<void>();
  m.biases = b.data<void>();
  m.sdtype = s.dtype();
  m.bits = pp.bits;
  m.group_size = pp.group_size;
  m.experts = w.shape(0);
  m.rows = w.shape(1);
  m.cols = s.shape(2) * pp.group_size;
  return m;
}

// The checked operands shared by moe_swiglu and moe_prefill: flattened to (T, D) / (T, k)
// and row-contiguous when `flat`, else in x's and indices' own shapes and strides (the
// CPU primitives of moe_swiglu copy a strided one at eval time: at decode, the reshape
// and contiguous nodes they save cost ~8 us each, 7 per call).
struct MoeOperands {
  mx::Stream st;
  int T, D, I, k;
  mx::array x2, idx, sc; // x, uint32 ids, float32 scores
  ProjParams pg, pu, pd;
};

MoeOperands check_moe(
    const mx::array& x,
    const mx::array& indices,
    const mx::array& scores,
    const QuantProj& gate,
    const QuantProj& up,
    const QuantProj& down,
    mx::StreamOrDevice s,
    bool flat) {
  if (!is_float(x.dtype())) {
    fail("x must be float32, float16 or bfloat16; got " + dtype_str(x.dtype()) + ".");
  }
  if (x.ndim() < 1 || indices.ndim() < 1) {
    fail("x must be (..., D) and indices (..., k).");
  }
  if (!mx::issubdtype(indices.dtype(), mx::integer)) {
    fail("indices must be integer expert ids; got " + dtype_str(indices.dtype()) + ".");
  }
  if (!is_float(scores.dtype())) {
    fail("scores must be floating point; got " + dtype_str(scores.dtype()) + ".");
  }
  mx::Shape lead(x.shape().begin(), x.shape().end() - 1);
  mx::Shape ilead(indices.shape().begin(), indices.shape().end() - 1);
  if (lead != ilead) {
    fail(
        "indices " + shape_str(indices.shape()) + " must have the leading shape of x " +
        shape_str(x.shape()) + ", plus k.");
  }
  if (scores.shape() != indices.shape()) {
    fail(
        "scores " + shape_str(scores.shape()) + " must have the shape of indices " +
        shape_str(indices.shape()) + ".");
  }
  const int D = x.shape(-1);
  const int k = indices.shape(-1);
  if (k < 1) {
    fail("k (indices.shape[-1]) must be at least 1.");
  }
  // The kernels divide by D (the down pass batches tokens by k * D floats).
  if (D < 1) {
    fail("x " + shape_str(x.shape()) + " has hidden size 0; it must be at least 1.");
  }
  if (gate.weight.ndim() != 3) {
    fail(
        "gate: weight must be (experts, out, in*bits/32); got shape " +
        shape_str(gate.weight.shape()) + ".");
  }
  const int I = gate.weight.shape(1);
  const int E = check_proj("gate", gate, I, D, 0);
  check_proj("up", up, I, D, E);
  check_proj("down", down, D, I, E);
  // One scales dtype for gate and up: the fused gate/up kernel reads both with one type.
  // Checked here, for every backend, rather than when a GPU launch is encoded.
  if (gate.scales.dtype() != up.scales.dtype()) {
    fail(
        "gate and up scales must share one dtype; got " + dtype_str(gate.scales.dtype()) + " and " +
        dtype_str(up.scales.dtype()) + ".");
  }

  // Tokens are one int axis of the flattened arrays: count them without overflow.
  long long tokens = 1;
  for (auto d : lead) {
    tokens *= d;
    if (tokens > std::numeric_limits<int>::max()) {
      fail(
          "x " + shape_str(x.shape()) +
          " has more than 2^31 - 1 tokens (product of the "
          "leading dimensions).");
    }
  }
  const int T = static_cast<int>(tokens);

  auto st = mx::to_stream(s);
  // The kernels read uint32 ids and refuse ids >= E. 64-bit ids outside [0, 2^32) would
  // wrap into range when narrowed (2^32 + 1 -> 1): map them to 0xFFFFFFFF, which no
  // expert has, so the kernels' check reports them instead.
  auto ids = indices;
  if (mx::size_of(indices.dtype()) == 8) {
    const auto bad = mx::issubdtype(indices.dtype(), mx::signedinteger)
        ? mx::logical_or(
              mx::less(ids, mx::array(0, indices.dtype()), st),
              mx::greater(ids, mx::array(0xFFFFFFFFLL, indices.dtype()), st),
              st)
        : mx::greater(ids, mx::array(0xFFFFFFFFULL, indices.dtype()), st);
    ids = mx::where(bad, mx::array(0xFFFFFFFFu, mx::uint32), mx::astype(ids, mx::uint32, st), st);
  }
  auto x2 = x;
  auto idx = mx::astype(ids, mx::uint32, st); // no node when they are uint32 already
  auto sc = mx::astype(scores, mx::float32, st);
  if (flat) { // row-contiguous, so the kernels index flat arrays
    x2 = contiguous_as(x2, {T, D}, st);
    idx = mx::contiguous(mx::reshape(idx, {T, k}, st), false, st);
    sc = mx::contiguous(mx::reshape(sc, {T, k}, st), false, st);
  }
  return {
      st,
      T,
      D,
      I,
      k,
      x2,
      idx,
      sc,
      {gate.bits, gate.group_size},
      {up.bits, up.group_size},
      {down.bits, down.group_size}};
}

} // namespace

mx::array moe_swiglu(
    const mx::array& x,
    const mx::array& indices,
    const mx::array& scores,
    const QuantProj& gate,
    const QuantProj& up,
    const QuantProj& down,
    mx::StreamOrDevice s) {
  check_metal_stream(s, "moe_swiglu");
  const bool flat = mx::to_stream(s).device == mx::Device::gpu;
  auto o = check_moe(x, indices, scores, gate, up, down, s, flat);
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), o.st); };
  auto h = mx::array(
      {o.T, o.k, o.I},
      mx::float32,
      std::make_shared<MoeGateUp>(o.st, o.pg, o.pu),
      {o.x2,
       o.idx,
       c(gate.weight),
       c(gate.scales),
       c(gate.biases),
       c(up.weight),
       c(up.scales),
       c(up.biases)});
  // y has the shape of indices with D for k: (T, D) flat, x's shape on the CPU.
  mx::Shape y_shape = o.idx.shape();
  y_shape.back() = o.D;
  auto y = mx::array(
      y_shape,
      x.dtype(),
      std::make_shared<MoeDown>(o.st, o.pd),
      {h, o.idx, o.sc, c(down.weight), c(down.scales), c(down.biases)});
  return flat ? mx::reshape(y, x.shape(), o.st) : y;
}

mx::array moe_prefill(
    const mx::array& x,
    const mx::array& indices,
    const mx::array& scores,
    const QuantProj& gate,
    const QuantProj& up,
    const QuantProj& down,
    mx::StreamOrDevice s) {
  if (wants_gpu(s)) {
    throw std::invalid_argument(
        "[moequant.moe_prefill] has no GPU kernel (MLX's gather_qmm batches tokens on the "
        "GPU); use a CPU stream.");
  }
  auto o = check_moe(x, indices, scores, gate, up, down, s, true);
  auto c = [&](const mx::array& a) { return contiguous_as(a, a.shape(), o.st); };
  auto y = mx::array(
      {o.T, o.D},
      x.dtype(),
      std::make_shared<MoePrefill>(o.st, o.pg, o.pu, o.pd),
      {o.x2,
       o.idx,
       o.sc,
       c(gate.weight),
       c(gate.scales),
       c(gate.biases),
       c(up.weight),
       c(up.scales),
       c(up.biases),
       c(down.weight),
       c(down.scales),
       c(down.biases)});
  return mx::reshape(y, x.shape(), o.st);
}

bool MoeGateUp::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MoeGateUp&>(other);
  return gate_ == o.gate_ && up_ == o.up_;
}

// in[1] is the ids (T, k) (GPU) or (..., k) (CPU); in[2] the gate weight (E, I, .).
std::vector<mx::Shape> MoeGateUp::output_shapes(const std::vector<mx::array>& in) {
  const int k = in[1].shape(-1);
  return {{static_cast<int>(in[1].size()) / k, k, in[2].shape(1)}};
}

bool MoeDown::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MoeDown&>(other);
  return down_ == o.down_;
}

std::vector<mx::Shape> MoeDown::output_shapes(const std::vector<mx::array>& in) {
  mx::Shape y = in[1].shape(); // the ids with D for k
  y.back() = in[3].shape(1);
  return {y};
}

void MoeGateUp::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  cpu::GateUpArgs a;
  a.xdtype = in[0].dtype();
  a.T = out.shape(0);
  a.k = out.shape(1);
  a.gate = qmat(in[2], in[3], in[4], gate_);
  a.up = qmat(in[5], in[6], in[7], up_);
  a.h = out.data<float>();
  // MLX keeps the inputs alive until this task has run, so raw pointers are safe; x and
  // the ids come in any shape and strides (check_moe), copied to rows here if strided.
  enqueue_cpu(stream(), in, {out}, [a, x = in[0], ids = in[1]]() mutable {
    with_rows(x, [&](const void* xr) {
      with_rows(ids, [&](const void* ir) {
        a.x = xr;
        a.idx = static_cast<const uint32_t*>(ir);
        cpu::moe_gate_up(a);
      });
    });
  });
}

void MoeDown::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  cpu::DownArgs a;
  a.h = in[0].data<float>();
  a.T = in[0].shape(0);
  a.k = in[0].shape(1);
  a.down = qmat(in[3], in[4], in[5], down_);
  a.y = out.data<void>();
  a.ydtype = out.dtype();
  // The ids and scores in any shape and strides, copied to rows here if strided.
  enqueue_cpu(stream(), in, {out}, [a, ids = in[1], sc = in[2]]() mutable {
    with_rows(ids, [&](const void* ir) {
      with_rows(sc, [&](const void* sr) {
        a.idx = static_cast<const uint32_t*>(ir);
        a.scores = static_cast<const float*>(sr);
        cpu::moe_down(a);
      });
    });
  });
}

bool MoePrefill::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const MoePrefill&>(other);
  return gate_ == o.gate_ && up_ == o.up_ && down_ == o.down_;
}

std::vector<mx::Shape> MoePrefill::output_shapes(const std::vector<mx::array>& in) {
  return {in[0].shape()};
}

void MoePrefill::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  cpu::PrefillArgs a;
  a.x = in[0].data<void>();
  a.xdtype = in[0].dtype();
  a.idx = in[1].data<uint32_t>();
  a.scores = in[2].data<float>();
  a.T = in[0].shape(0);
  a.k = in[1].shape(1);
  a.gate = qmat(in[3], in[4], in[5], gate_);
  a.up = qmat(in[6], in[7], in[8], up_);
  a.down = qmat(in[9], in[10], in[11], down_);
  a.y = out.data<void>();
  enqueue_cpu(stream(), in, {out}, [a]() { cpu::moe_prefill(a); });
}

void MoePrefill::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[moequant.moe_prefill] has no GPU kernel (MLX's gather_qmm batches tokens on the "
      "GPU); use a CPU stream.");
}

// ---- Metal: the host dispatch, written against KernelEncoder (common/kernel_encoder.h) so
// that the emulator tests execute it too; geometry and indices from moe_swiglu_launch.h.

namespace {

uint32_t row_tiles(uint32_t rows) {
  return (rows + MQ_MOE_ROWS_PER_TG - 1) / MQ_MOE_ROWS_PER_TG;
}

constexpr Dim3 kMoeThreadgroup{MQ_MOE_LANES, MQ_MOE_SIMDGROUPS, 1};

} // namespace

void MoeGateUp::encode(
    KernelEncoder& enc,
    const std::vector<mx::array>& in,
    const std::vector<mx::array>& out) const {
  const uint32_t T = in[0].shape(0), D = in[0].shape(1), k = in[1].shape(1);
  const uint32_t I = in[2].shape(1), E = in[2].shape(0);
  if (T * k == 0 || I == 0) {
    return;
  }
  // check_moe guarantees one scales dtype for gate and up (the kernel's S).
  enc.set_kernel(
      launch::moe_gate_up_name(
          dtype_str(in[0].dtype()), dtype_str(in[3].dtype()), gate_.bits, up_.bits));
  const int bufs[8] = {
      MQ_GU_X,
      MQ_GU_IDX,
      MQ_GU_GATE_W,
      MQ_GU_GATE_S,
      MQ_GU_GATE_B,
      MQ_GU_UP_W,
      MQ_GU_UP_S,
      MQ_GU_UP_B};
  for (int i = 0; i < 8; ++i) {
    enc.set_input(in[i], bufs[i]);
  }
  enc.set_output(out[0], MQ_GU_H);
  enc.set_scalar(D, MQ_GU_D);
  enc.set_scalar(I, MQ_GU_I);
  enc.set_scalar(k, MQ_GU_K);
  enc.set_scalar(E, MQ_GU_E);
  enc.set_scalar(static_cast<uint32_t>(gate_.group_size), MQ_GU_GATE_GROUP);
  enc.set_scalar(static_cast<uint32_t>(up_.group_size), MQ_GU_UP_GROUP);
  enc.dispatch_threadgroups({row_tiles(I), T * k, 1}, kMoeThreadgroup);
}

void MoeDown::encode(
    KernelEncoder& enc,
    const std::vector<mx::array>& in,
    const std::vector<mx::array>& out) const {
  const uint32_t T = in[0].shape(0), k = in[0].shape(1), I = in[0].shape(2);
  const uint32_t D = in[3].shape(1), E = in[3].shape(0);
  if (T == 0 || D == 0) {
    return;
  }
  enc.set_kernel(
      launch::moe_down_name(dtype_str(out[0].dtype()), dtype_str(in[4].dtype()), down_.bits));
  const int bufs[6] = {MQ_DN_H, MQ_DN_IDX, MQ_DN_SCORES, MQ_DN_W, MQ_DN_S, MQ_DN_B};
  for (int i = 0; i < 6; ++i) {
    enc.set_input(in[i], bufs[i]);
  }
  enc.set_output(out[0], MQ_DN_Y);
  enc.set_scalar(D, MQ_DN_D);
  enc.set_scalar(I, MQ_DN_I);
  enc.set_scalar(k, MQ_DN_K);
  enc.set_scalar(E, MQ_DN_E);
  enc.set_scalar(static_cast<uint32_t>(down_.group_size), MQ_DN_GROUP);
  enc.dispatch_threadgroups({row_tiles(D), T, 1}, kMoeThreadgroup);
}

void MoeGateUp::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  std::vector<mx::array> outs{out};
  eval_metal(stream(), *this, outs, in, "moe_swiglu");
}

void MoeDown::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  std::vector<mx::array> outs{out};
  eval_metal(stream(), *this, outs, in, "moe_swiglu");
}

} // namespace moequant
