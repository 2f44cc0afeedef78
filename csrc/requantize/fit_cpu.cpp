// The mse fit on the CPU: the scalar path, the path choice and the threading.
#include "requantize/fit_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/thread_pool.h"
#include "mlx/types/half_types.h"

namespace moequant::fit {
namespace {
#include "requantize_fit.h"
#include "requantize/fit_rows.h"
} // namespace

void fit_groups_scalar(const FitArgs& a, bool int4, std::size_t g0, std::size_t g1) {
  fit_groups_dispatch<mq_fit_scalar, mq_rows_scalar>(a, int4, g0, g1);
}

namespace {

bool use_avx2() {
#if defined(__x86_64__) && defined(MOEQUANT_FIT_AVX2)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("popcnt");
  const char* e = std::getenv("MOEQUANT_CPU_PATH");
  return ok && !(e && std::string(e) == "scalar");
#else
  return false;
#endif
}

void run(FitArgs a, bool int4) {
  const std::size_t groups = a.rows * static_cast<std::size_t>(a.K / a.group_size);
  // All-ones importance (the default): INT4 slot weights are the nibble counts.
  a.unit_importance = a.importance == nullptr ||
      std::all_of(a.importance, a.importance + a.K, [](float x) { return x == 1.0f; });
  const bool avx2 = use_avx2();
  // Groups are independent: any split gives the same bits. ~1 us each, so claims of
  // 64 groups keep the pool's overhead small and the cores balanced.
  dynamic_for(groups, 64, [&](auto claim) {
    claim([&](std::size_t g0, std::size_t g1) {
      if (avx2) {
        fit_groups_avx2(a, int4, g0, g1);
      } else {
        fit_groups_scalar(a, int4, g0, g1);
      }
    });
  });
}

} // namespace

const char* fit_path() {
  return use_avx2() ? "avx2" : "scalar";
}

void fit_int4(const FitArgs& a) {
  run(a, true);
}

void fit_float(const FitArgs& a) {
  run(a, false);
}

#if !(defined(__x86_64__) && defined(MOEQUANT_FIT_AVX2))
void fit_groups_avx2(const FitArgs& a, bool int4, std::size_t g0, std::size_t g1) {
  fit_groups_scalar(a, int4, g0, g1);
}
#endif

} // namespace moequant::fit
