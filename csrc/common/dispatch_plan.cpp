// Test-only binding moequant._ext._metal_dispatch_plan: runs the Metal host dispatch of
// every moequant primitive in a graph on a recording KernelEncoder and returns the plan
// (kernels, buffer bindings, constants, grids) for the CPU emulator of MSL
// (tests/metal_emulator/dispatch.py) to execute. No GPU and no Metal headers involved:
// the code recorded is the same encode() that eval_gpu runs on macOS.
#include "common/dispatch_plan.h"

#include <functional>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/primitives.h"
#include "mlx/utils.h"
// after mlx/utils.h (operator<< of Dtype)
#include "common/checks.h"
#include "common/kernel_encoder.h"
#include "mlx/transforms.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace moequant {

namespace {

class RecordingEncoder final : public KernelEncoder {
 public:
  explicit RecordingEncoder(nb::list& launches) : launches_(launches) {}

  void set_kernel(const std::string& name) override {
    cur_ = nb::dict();
    cur_["kernel"] = name;
    bufs_ = nb::dict();
    cur_["buffers"] = bufs_;
  }
  void set_input(const mx::array& a, int index) override {
    bind(index, nb::make_tuple("array", static_cast<uint64_t>(a.id())));
  }
  void set_output(const mx::array& a, int index) override {
    bind(index, nb::make_tuple("array", static_cast<uint64_t>(a.id())));
  }
  void set_bytes(const void* data, size_t size, int index) override {
    bind(index, nb::make_tuple("bytes", nb::bytes(static_cast<const char*>(data), size)));
  }
  void dispatch_threadgroups(Dim3 grid, Dim3 tg) override {
    if (!cur_.is_valid()) {
      throw std::logic_error("dispatch before set_kernel");
    }
    cur_["grid"] = nb::make_tuple(grid.x, grid.y, grid.z);
    cur_["threadgroup"] = nb::make_tuple(tg.x, tg.y, tg.z);
    launches_.append(cur_);
    // The next launch starts from a fresh kernel and bindings, as after MLX's dispatch
    // (a real encoder would keep stale bindings; the emulator must not rely on them).
    cur_ = nb::dict();
    cur_.reset();
  }

 private:
  void bind(int index, nb::tuple what) {
    if (!cur_.is_valid()) {
      throw std::logic_error("buffer bound before set_kernel");
    }
    bufs_[nb::int_(index)] = what;
  }
  nb::list& launches_;
  nb::dict cur_;
  nb::dict bufs_;
};

// Follows views (reshape, contiguous copies: single-input primitives) from `a` down to
// the output of a moequant primitive, if there is one.
const mx::array* own_source(const mx::array& a) {
  const mx::array* p = &a;
  while (p->has_primitive()) {
    if (dynamic_cast<const MetalDispatch*>(&p->primitive())) {
      return p;
    }
    if (p->inputs().size() != 1) {
      return nullptr;
    }
    p = &p->inputs()[0];
  }
  return nullptr;
}

} // namespace

nb::dict metal_dispatch_plan(const std::vector<mx::array>& arrays) {
  // Topological order of the moequant primitives the arrays depend on.
  std::vector<mx::array> nodes;
  std::unordered_set<uintptr_t> seen;
  std::function<void(const mx::array&)> visit = [&](const mx::array& a) {
    if (seen.count(a.id()) || !a.has_primitive()) {
      return;
    }
    for (auto& s : a.outputs()) {
      seen.insert(s.id());
    }
    for (auto& in : a.inputs()) {
      visit(in);
    }
    if (dynamic_cast<const MetalDispatch*>(&a.primitive())) {
      nodes.push_back(a);
    }
  };
  for (auto& a : arrays) {
    visit(a);
  }
  std::unordered_set<uintptr_t> produced;
  for (auto& n : nodes) {
    for (auto& o : n.outputs()) {
      produced.insert(o.id());
    }
  }
  // Inputs not produced by a moequant primitive are evaluated here (on their own
  // streams, the CPU in tests) and handed over as values.
  std::vector<mx::array> external;
  for (auto& n : nodes) {
    for (auto& in : n.inputs()) {
      if (!produced.count(in.id())) {
        external.push_back(in);
      }
    }
  }
  mx::eval(external);

  nb::list launches;
  nb::dict values, outputs;
  for (auto& in : external) {
    values[nb::int_(static_cast<uint64_t>(in.id()))] = nb::cast(in);
  }
  RecordingEncoder enc(launches);
  for (auto& n : nodes) {
    auto outs = n.outputs();
    for (auto& o : outs) {
      outputs[nb::int_(static_cast<uint64_t>(o.id()))] = nb::make_tuple(
          nb::cast(std::vector<int>(o.shape().begin(), o.shape().end())), dtype_str(o.dtype()));
    }
    dynamic_cast<const MetalDispatch&>(n.primitive()).encode(enc, n.inputs(), outs);
  }
  nb::list results;
  for (auto& a : arrays) {
    const mx::array* src = own_source(a);
    results.append(src ? nb::cast(static_cast<uint64_t>(src->id())) : nb::none());
  }
  nb::dict plan;
  plan["launches"] = launches;
  plan["values"] = values;
  plan["outputs"] = outputs;
  plan["results"] = results;
  return plan;
}

void register_dispatch_plan(nb::module_& m) {
  m.def(
      "_metal_dispatch_plan",
      &metal_dispatch_plan,
      "arrays"_a,
      "Test only: the Metal dispatch plan of the moequant primitives behind `arrays`, "
      "recorded from their host code (see tests/metal_emulator/dispatch.py).");
}

} // namespace moequant
