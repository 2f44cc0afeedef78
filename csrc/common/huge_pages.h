// Transparent huge pages for buffers that are streamed every decode step.
#pragma once

#include <cstddef>

namespace moequant {

// Asks the kernel to back the 2 MiB-aligned part of [p, p + n) with transparent
// huge pages: MADV_HUGEPAGE, then (if `collapse`) MADV_COLLAPSE, which moves the
// pages now instead of leaving it to khugepaged. The contents are unchanged. Returns
// the size of the range advised (with `collapse`: advised and collapsed), 0 where the
// system refuses: not Linux, THP disabled, Linux < 6.1 for the collapse, no free huge
// pages.
std::size_t advise_huge_pages(const void* p, std::size_t n, bool collapse);

} // namespace moequant
