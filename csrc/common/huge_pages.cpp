#include "common/huge_pages.h"

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace moequant {

std::size_t advise_huge_pages(const void* p, std::size_t n, bool collapse) {
#ifdef __linux__
  constexpr std::uintptr_t huge = std::uintptr_t(1) << 21;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t lo = (a + huge - 1) & ~(huge - 1);
  const std::uintptr_t hi = (a + n) & ~(huge - 1);
  if (hi <= lo) {
    return 0;
  }
  void* start = reinterpret_cast<void*>(lo);
  if (madvise(start, hi - lo, MADV_HUGEPAGE) != 0) {
    return 0;
  }
  if (collapse) {
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25 // Linux 6.1 uapi; older headers lack it
#endif
    if (madvise(start, hi - lo, MADV_COLLAPSE) != 0) {
      return 0;
    }
  }
  return hi - lo;
#else
  (void)p;
  (void)n;
  (void)collapse;
  return 0;
#endif
}

} // namespace moequant
