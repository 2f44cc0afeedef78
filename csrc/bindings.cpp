// The nanobind module moequant._ext: thin wrappers, documented in python/moequant.
#include <algorithm>
#include <stdexcept>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include "common/dispatch_plan.h"
#include "common/huge_pages.h"
#include "common/kernel_encoder.h"
#include "mlx/transforms.h"
#include "common/thread_pool.h"
#include "dense_gemm/dense_gemm.h"
#include "dense_gemm/dense_linear.h"
#include "softmax_rows/softmax_rows.h"
#include "norm_rope/norm_rope.h"
#include "embedding/quantized_embedding.h"
#include "mla_attention/mla_attention.h"
#include "mla_attention/mla_attention_cpu.h"
#include "moe_swiglu/moe_swiglu.h"
#include "moe_swiglu/moe_swiglu_cpu.h"
#include "qgemm/qgemm.h"
#include "quantized_linear/quantized_linear.h"
#include "quantized_linear/quantized_multi_linear.h"
#include "requantize/requantize.h"
#include "requantize/requantize_cpu.h"
#include "requantize/fit_cpu.h"
#include "requantize/requantize_mse.h"

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

  // mx.quantize's min-max on every core, bit for bit (convert's bf16 modules).
  m.def(
      "quantize_minmax",
      &moequant::quantize_minmax,
      "w"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a = 64,
      "stream"_a = nb::none());

  // The mse fit (python/moequant/ops.py documents both).
  m.def(
      "requantize_int4_fit",
      &moequant::requantize_int4_fit,
      "packed"_a,
      "scales"_a,
      "importance"_a.none(),
      nb::kw_only(),
      "bits"_a,
      "group_size"_a = 64,
      "src_group_size"_a = 32,
      "dtype"_a = nb::none(),
      "stream"_a = nb::none());
  m.def(
      "quantize_fit",
      &moequant::quantize_fit,
      "w"_a,
      "importance"_a.none(),
      nb::kw_only(),
      "bits"_a,
      "group_size"_a = 64,
      "dtype"_a = nb::none(),
      "stream"_a = nb::none());
  m.def(
      "check_quantize_args",
      &moequant::check_quantize_args,
      "w"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a,
      "dtype"_a = nb::none());
  m.def("fit_path", &moequant::fit::fit_path);

  // Projections cross as (weight, scales, biases, bits, group_size) tuples; the
  // Python wrapper (moequant.ops.moe_swiglu) accepts QuantizedSwitchLinear too.
  using Proj = std::tuple<mx::array, mx::array, mx::array, int, int>;
  auto to_proj = [](const Proj& p) {
    return moequant::QuantProj{
        std::get<0>(p), std::get<1>(p), std::get<2>(p), std::get<3>(p), std::get<4>(p)};
  };
  // moe_swiglu (decode GEMV) and moe_prefill (batched) share their signature.
  using MoeFn = mx::array (*)(
      const mx::array&,
      const mx::array&,
      const mx::array&,
      const moequant::QuantProj&,
      const moequant::QuantProj&,
      const moequant::QuantProj&,
      mx::StreamOrDevice);
  for (auto [name, fn] :
       {std::pair<const char*, MoeFn>{"moe_swiglu", &moequant::moe_swiglu},
        std::pair<const char*, MoeFn>{"moe_prefill", &moequant::moe_prefill}}) {
    m.def(
        name,
        [to_proj, fn](
            const mx::array& x,
            const mx::array& indices,
            const mx::array& scores,
            const Proj& gate,
            const Proj& up,
            const Proj& down,
            mx::StreamOrDevice s) {
          return fn(x, indices, scores, to_proj(gate), to_proj(up), to_proj(down), s);
        },
        "x"_a,
        "indices"_a,
        "scores"_a,
        "gate"_a,
        "up"_a,
        "down"_a,
        nb::kw_only(),
        "stream"_a = nb::none());
  }
  m.def("moe_cpu_path", &moequant::cpu::moe_cpu_path);

  m.def(
      "quantized_linear",
      &moequant::quantized_linear,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a,
      "stream"_a = nb::none());
  m.def(
      "quantized_multi_linear",
      &moequant::quantized_multi_linear,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a,
      "stream"_a = nb::none());
  m.def("matmul_nt", &moequant::matmul_nt, "a"_a, "b"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def(
      "dense_linear",
      &moequant::dense_linear,
      "x"_a,
      "w"_a,
      nb::kw_only(),
      "stream"_a = nb::none());
  m.def(
      "softmax_rows",
      &moequant::softmax_rows,
      "s"_a,
      "mask"_a = nb::none(),
      nb::kw_only(),
      "scale"_a = 1.0f,
      "stream"_a = nb::none());
  m.def(
      "quantized_embedding",
      &moequant::quantized_embedding,
      "ids"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "bits"_a,
      "group_size"_a,
      "stream"_a = nb::none());
  m.def(
      "rms_norm",
      &moequant::rms_norm,
      "x"_a,
      "weight"_a.none(),
      "eps"_a,
      nb::kw_only(),
      "stream"_a = nb::none());
  m.def(
      "rope",
      [](const mx::array& x,
         int dims,
         bool traditional,
         std::optional<float> base,
         float scale,
         const std::variant<int, mx::array>& offset,
         const std::optional<mx::array>& freqs,
         mx::StreamOrDevice s) {
        const mx::array off = std::holds_alternative<int>(offset)
            ? mx::array(std::get<int>(offset), mx::int32)
            : std::get<mx::array>(offset);
        return moequant::rope(x, dims, traditional, base, scale, off, freqs, s);
      },
      "x"_a,
      "dims"_a,
      nb::kw_only(),
      "traditional"_a,
      "base"_a.none(),
      "scale"_a,
      "offset"_a,
      "freqs"_a = nb::none(),
      "stream"_a = nb::none());
  m.def("qgemm_path", &moequant::qgemm::gemm_path);
  m.def(
      "fma_peak_gflops",
      &moequant::qgemm::fma_peak_gflops,
      "seconds"_a = 0.5,
      nb::call_guard<nb::gil_scoped_release>());
  // Test hook: qgemm::gemm called directly (row ranges, gathered rows of x) on
  // evaluated row-contiguous arrays; returns (m1 - m0, n1 - n0) float32.
  m.def(
      "_qgemm",
      [](mx::array x,
         mx::array w,
         mx::array s,
         mx::array b,
         int bits,
         int group_size,
         int64_t n0,
         int64_t n1,
         int64_t m0,
         int64_t m1,
         std::optional<mx::array> rows) {
        mx::array r = rows ? mx::astype(*rows, mx::int64) : mx::array(0);
        mx::eval({x, w, s, b, r});
        for (auto* a : {&x, &w, &s, &b}) {
          if (!a->flags().row_contiguous) {
            throw std::invalid_argument("_qgemm: arrays must be row-contiguous");
          }
        }
        const int64_t M = rows ? r.size() : x.shape(0);
        if (rows) {
          for (int64_t i = 0; i < M; ++i) {
            if (r.data<int64_t>()[i] < 0 || r.data<int64_t>()[i] >= x.shape(0)) {
              throw std::invalid_argument("_qgemm: row index out of range");
            }
          }
        }
        moequant::qgemm::QuantWeight W{
            w.data<uint32_t>(),
            s.data<void>(),
            b.data<void>(),
            s.dtype(),
            bits,
            group_size,
            w.shape(0),
            x.shape(1)};
        if (w.shape(1) * 32 != x.shape(1) * bits) {
          throw std::invalid_argument("_qgemm: w does not match x's K");
        }
        const moequant::qgemm::Activations xa(
            x.data<void>(),
            x.dtype(),
            M,
            x.shape(1),
            x.shape(1),
            rows ? r.data<int64_t>() : nullptr);
        if (m1 < 0) {
          m1 = M;
        }
        std::vector<float> y(std::max<int64_t>(0, (m1 - m0) * (n1 - n0)));
        moequant::qgemm::gemm(xa, W, n0, n1, y.data(), n1 - n0, m0, m1);
        return mx::array(
            y.begin(), {static_cast<int>(m1 - m0), static_cast<int>(n1 - n0)}, mx::float32);
      },
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "bits"_a,
      "group_size"_a,
      "n0"_a,
      "n1"_a,
      "m0"_a = 0,
      "m1"_a = -1,
      "rows"_a = nb::none());

  m.def(
      "mla_decode_attention",
      &moequant::mla_decode_attention,
      "q_lat"_a,
      "q_pe"_a,
      "lat_w"_a,
      "lat_s"_a,
      "lat_b"_a,
      "pe_w"_a,
      "pe_s"_a,
      "pe_b"_a,
      nb::kw_only(),
      "scale"_a,
      "bits"_a,
      "group_size"_a,
      "stream"_a = nb::none());
  m.def("mla_cpu_path", &moequant::cpu::mla_cpu_path);
  m.def(
      "mla_decode_core",
      &moequant::mla_decode_core,
      "q_nope"_a,
      "q_pe"_a,
      "latent"_a,
      "k_pe"_a,
      "wq"_a,
      "sq"_a,
      "bq"_a,
      "wo"_a,
      "so"_a,
      "bo"_a,
      nb::kw_only(),
      "scale"_a,
      "q_bits"_a,
      "q_group_size"_a,
      "o_bits"_a,
      "o_group_size"_a,
      "stream"_a = nb::none());
  m.def(
      "_mla_decode_core_mlx_graph",
      &moequant::mla_decode_core_mlx_graph,
      "q_nope"_a,
      "q_pe"_a,
      "latent"_a,
      "k_pe"_a,
      "wq"_a,
      "sq"_a,
      "bq"_a,
      "wo"_a,
      "so"_a,
      "bo"_a,
      nb::kw_only(),
      "scale"_a,
      "q_bits"_a,
      "q_group_size"_a,
      "o_bits"_a,
      "o_group_size"_a,
      "stream"_a = nb::none(),
      "Test only: mla_decode_core's GPU form (MLX's ops) on any stream.");
  m.def(
      "_mla_decode_attention_metal_graph",
      &moequant::mla_decode_attention_metal_graph,
      "q_lat"_a,
      "q_pe"_a,
      "lat_w"_a,
      "lat_s"_a,
      "lat_b"_a,
      "pe_w"_a,
      "pe_s"_a,
      "pe_b"_a,
      nb::kw_only(),
      "scale"_a,
      "bits"_a,
      "group_size"_a,
      "stream"_a = nb::none(),
      "Test only: mla_decode_attention's Metal form on any stream, for "
      "_metal_dispatch_plan (not evaluable on the CPU).");

  m.def(
      "advise_huge_pages",
      [](const mx::array& a, bool collapse) {
        // The array's whole data buffer (data_size elements), contiguous or not.
        if (!a.is_available()) {
          throw std::invalid_argument("advise_huge_pages: the array is not evaluated.");
        }
        return moequant::advise_huge_pages(
            a.data<uint8_t>(), a.data_size() * a.itemsize(), collapse);
      },
      "array"_a,
      "collapse"_a = true);
  m.def("get_num_threads", &moequant::get_num_threads);
  m.def("set_num_threads", &moequant::set_num_threads, "n"_a);
  m.def("requantize_simd_available", &moequant::cpu::requantize_simd_available);
  m.def("metal_status", []() {
    auto st = moequant::metal_status();
    return std::make_pair(st.available, st.reason);
  });
  moequant::register_dispatch_plan(m);
}
