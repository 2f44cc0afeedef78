// eval_gpu through MLX's Metal command encoder, and whether Metal can run at all.
#include <dlfcn.h>

#include <fstream>
#include <stdexcept>
#include <variant>

#include "common/kernel_encoder.h"
#include "common/metal_library.h"

#if MOEQUANT_WITH_METAL
#include "mlx/backend/metal/device.h"
#endif

namespace moequant {

std::string extension_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&extension_dir), &info) == 0 || !info.dli_fname) {
    return ".";
  }
  std::string path(info.dli_fname);
  auto slash = path.find_last_of('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

namespace {

bool file_exists(const std::string& p) {
  return std::ifstream(p).good();
}

} // namespace

MetalStatus metal_status() {
  const std::string dir = extension_dir();
  const std::string err = dir + "/" MOEQUANT_METAL_ERROR_FILE;
  if (file_exists(err)) {
    std::ifstream f(err);
    std::string line;
    std::getline(f, line);
    return {
        false,
        "its Metal kernels failed to compile when this moequant was built "
        "(MOEQUANT_METAL=auto kept a CPU-only install): " +
            line + " (details: " + err +
            "; reinstall with MOEQUANT_METAL=on to stop at the error)"};
  }
#if MOEQUANT_WITH_METAL
  const std::string lib = dir + "/" MOEQUANT_METALLIB_NAME ".metallib";
  if (!file_exists(lib)) {
    return {false, "its Metal kernel library is missing (" + lib + ")"};
  }
  return {true, ""};
#elif defined(MOEQUANT_METAL_OFF)
  return {false, "this build of moequant has Metal turned off (MOEQUANT_METAL=off)"};
#else
  return {
      false,
      "this build of moequant has no Metal support (MLX has a Metal backend only on "
      "macOS)"};
#endif
}

bool wants_gpu(const mx::StreamOrDevice& s) {
  bool gpu = false;
  if (auto* d = std::get_if<mx::Device>(&s)) {
    gpu = d->type == mx::Device::gpu;
  } else if (auto* st = std::get_if<mx::Stream>(&s)) {
    gpu = st->device.type == mx::Device::gpu;
  } else if (auto* ts = std::get_if<mx::ThreadLocalStream>(&s)) {
    gpu = ts->device.type == mx::Device::gpu;
  } else if (auto* t = std::get_if<mx::Device::DeviceType>(&s)) {
    gpu = *t == mx::Device::gpu;
  } else if (std::holds_alternative<std::monostate>(s)) {
    gpu = mx::default_device().type == mx::Device::gpu;
  }
  return gpu;
}

void check_metal_stream(const mx::StreamOrDevice& s, const char* op) {
  if (!wants_gpu(s)) {
    return;
  }
  auto st = metal_status();
  if (!st.available) {
    throw std::runtime_error(
        std::string("[moequant.") + op + "] a GPU stream needs moequant's Metal kernels, but " +
        st.reason + ". Use stream=mx.cpu.");
  }
}

#if MOEQUANT_WITH_METAL
namespace {

// KernelEncoder on MLX's Metal command encoder (MLX 0.32.4's metal::CommandEncoder).
class MlxMetalEncoder final : public KernelEncoder {
 public:
  explicit MlxMetalEncoder(const mx::Stream& s)
      : d_(mx::metal::device(s.device)), enc_(mx::metal::get_command_encoder(s)) {}

  void set_kernel(const std::string& name) override {
    enc_.set_compute_pipeline_state(d_.get_kernel(name, metal_library(d_)));
  }
  void set_input(const mx::array& a, int index) override {
    enc_.set_input_array(a, index);
  }
  void set_output(const mx::array& a, int index) override {
    mx::array out = a; // shares the buffer; MLX's API takes a non-const reference
    enc_.set_output_array(out, index);
  }
  void set_bytes(const void* data, size_t size, int index) override {
    enc_.set_bytes(static_cast<const uint8_t*>(data), static_cast<int>(size), index);
  }
  void dispatch_threadgroups(Dim3 grid, Dim3 tg) override {
    enc_.dispatch_threadgroups(MTL::Size(grid.x, grid.y, grid.z), MTL::Size(tg.x, tg.y, tg.z));
  }

 private:
  mx::metal::Device& d_;
  mx::metal::CommandEncoder& enc_;
};

} // namespace
#endif

void eval_metal(
    const mx::Stream& stream,
    const MetalDispatch& p,
    std::vector<mx::array>& outputs,
    const std::vector<mx::array>& inputs,
    const char* op) {
  auto st = metal_status();
  if (!st.available) {
    throw std::runtime_error(
        std::string("[moequant.") + op + "] cannot run on the GPU: " + st.reason +
        ". Use stream=mx.cpu.");
  }
#if MOEQUANT_WITH_METAL
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  MlxMetalEncoder enc(stream);
  p.encode(enc, inputs, outputs);
#else
  (void)stream;
  (void)p;
  (void)outputs;
  (void)inputs;
#endif
}

} // namespace moequant
