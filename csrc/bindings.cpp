// The nanobind module moequant._ext: thin wrappers, documented in python/moequant.
#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include "common/huge_pages.h"
#include "common/thread_pool.h"
#include "moe_swiglu/moe_swiglu.h"
#include "moe_swiglu/moe_swiglu_cpu.h"
#include "requantize/requantize.h"
#include "requantize/requantize_cpu.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

NB_MODULE(_ext, m) {
  m.doc() = "moequant native kernels (MLX primitives)";

  m.def(
      "requantize_int4",
      &moequant::requantize_int4,
      "packed"_a,
      "scales"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a = 64,
      "src_group_size"_a = 32,
      "dtype"_a = nb::none(),
      "stream"_a = nb::none());

  // Projections cross as (weight, scales, biases, bits, group_size) tuples; the
  // Python wrapper (moequant.ops.moe_swiglu) accepts QuantizedSwitchLinear too.
  using Proj = std::tuple<mx::array, mx::array, mx::array, int, int>;
  auto to_proj = [](const Proj& p) {
    return moequant::QuantProj{
        std::get<0>(p), std::get<1>(p), std::get<2>(p), std::get<3>(p), std::get<4>(p)};
  };
  m.def(
      "moe_swiglu",
      [to_proj](
          const mx::array& x,
          const mx::array& indices,
          const mx::array& scores,
          const Proj& gate,
          const Proj& up,
          const Proj& down,
          mx::StreamOrDevice s) {
        return moequant::moe_swiglu(
            x, indices, scores, to_proj(gate), to_proj(up), to_proj(down), s);
      },
      "x"_a,
      "indices"_a,
      "scores"_a,
      "gate"_a,
      "up"_a,
      "down"_a,
      nb::kw_only(),
      "stream"_a = nb::none());
  m.def(
      "moe_prefill",
      [to_proj](
          const mx::array& x,
          const mx::array& indices,
          const mx::array& scores,
          const Proj& gate,
          const Proj& up,
          const Proj& down,
          mx::StreamOrDevice s) {
        return moequant::moe_prefill(
            x, indices, scores, to_proj(gate), to_proj(up), to_proj(down), s);
      },
      "x"_a,
      "indices"_a,
      "scores"_a,
      "gate"_a,
      "up"_a,
      "down"_a,
      nb::kw_only(),
      "stream"_a = nb::none());
  m.def("moe_cpu_path", &moequant::cpu::moe_cpu_path);

  m.def(
      "advise_huge_pages",
      [](const mx::array& a, bool collapse) {
        // The array's whole data buffer (data_size elements), contiguous or not.
        if (!a.is_available()) {
          throw std::invalid_argument("advise_huge_pages: the array is not evaluated.");
        }
        return moequant::advise_huge_pages(a.data<uint8_t>(), a.data_size() * a.itemsize(), collapse);
      },
      "array"_a,
      "collapse"_a = true);
  m.def("get_num_threads", &moequant::get_num_threads);
  m.def("set_num_threads", &moequant::set_num_threads, "n"_a);
  m.def("requantize_simd_available", &moequant::cpu::requantize_simd_available);
#ifdef _METAL_
  m.attr("has_metal") = true;
#else
  m.attr("has_metal") = false;
#endif
}
