// The encoder interface the Metal host dispatch is written against.
//
// Each op's GPU dispatch (which kernel, which arrays at which buffer indices, which
// constants, which grid) is a function of a KernelEncoder (`encode_*` next to each
// primitive). On macOS, eval_gpu runs it on MLX's Metal command encoder
// (metal_encoder.cpp); in the tests, a recording encoder (dispatch_plan.cpp, bound as
// moequant._ext._metal_dispatch_plan) captures the same calls as a plan that the CPU
// emulator of MSL executes. So Linux CI runs the very host code a Mac runs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/utils.h"

namespace moequant {

namespace mx = mlx::core;

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

class KernelEncoder {
 public:
  virtual ~KernelEncoder() = default;
  // A host name of moequant's metallib.
  virtual void set_kernel(const std::string& name) = 0;
  virtual void set_input(const mx::array& a, int index) = 0;
  virtual void set_output(const mx::array& a, int index) = 0;
  // Bound to a `constant T&` parameter.
  virtual void set_bytes(const void* data, size_t size, int index) = 0;
  // Grid counted in threadgroups (MTLComputeCommandEncoder dispatchThreadgroups).
  virtual void dispatch_threadgroups(Dim3 grid, Dim3 threadgroup) = 0;

  template <typename T>
  void set_scalar(const T& v, int index) {
    set_bytes(&v, sizeof(T), index);
  }
};

// A primitive whose GPU evaluation is one `encode` through a KernelEncoder; the outputs
// are allocated before `encode` runs. Mixed into the MLX primitive class.
class MetalDispatch {
 public:
  virtual ~MetalDispatch() = default;
  virtual void encode(
      KernelEncoder& enc,
      const std::vector<mx::array>& inputs,
      const std::vector<mx::array>& outputs) const = 0;
};

// eval_gpu of a MetalDispatch primitive: allocates the outputs and encodes on MLX's
// command encoder for `stream`. Off macOS (or without the metallib) it throws, naming
// `op` and why (metal_status()).
void eval_metal(
    const mx::Stream& stream,
    const MetalDispatch& p,
    std::vector<mx::array>& outputs,
    const std::vector<mx::array>& inputs,
    const char* op);

// Whether this build can run moequant's Metal kernels, and if not, why.
struct MetalStatus {
  bool available;
  std::string reason;
};
MetalStatus metal_status();

// Whether `s` names a GPU stream or device (the default device when empty).
bool wants_gpu(const mx::StreamOrDevice& s);

// Called by the op builders before the graph is built: a GPU stream or device when the
// Metal kernels cannot run raises a runtime_error naming `op` and the reason.
void check_metal_stream(const mx::StreamOrDevice& s, const char* op);

} // namespace moequant
