// Test-only: the recorded Metal dispatch plan of a graph (dispatch_plan.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace moequant {

void register_dispatch_plan(nanobind::module_& m);

} // namespace moequant
