"""moequant: native INT4 -> MLX requantization and fused MoE kernels for MLX."""

import mlx.core  # noqa: F401  (registers mx.array with nanobind before _ext loads)

from . import int4
from .mlx_lm_patch import patch, unpatch
from .ops import (
    get_num_threads,
    has_metal,
    huge_pages,
    moe_cpu_path,
    moe_prefill,
    moe_swiglu,
    requantize_int4,
    set_num_threads,
)

__all__ = [
    "int4",
    "patch",
    "unpatch",
    "moe_swiglu",
    "moe_cpu_path",
    "moe_prefill",
    "requantize_int4",
    "get_num_threads",
    "set_num_threads",
    "has_metal",
    "huge_pages",
]
__version__ = "0.1.0"
