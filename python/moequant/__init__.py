"""moequant: native INT4 -> MLX requantization and fused MoE kernels for MLX."""

import mlx.core  # noqa: F401  (registers mx.array with nanobind before _ext loads)

from . import int4
from .mlx_lm_patch import patch, patch_linear, unpatch
from .ops import (
    get_num_threads,
    has_metal,
    huge_pages,
    mla_cpu_path,
    mla_decode_attention,
    moe_cpu_path,
    moe_prefill,
    moe_swiglu,
    qgemm_path,
    quantized_linear,
    requantize_int4,
    set_num_threads,
)

__all__ = [
    "int4",
    "patch",
    "patch_linear",
    "unpatch",
    "moe_swiglu",
    "moe_cpu_path",
    "moe_prefill",
    "quantized_linear",
    "qgemm_path",
    "requantize_int4",
    "get_num_threads",
    "set_num_threads",
    "has_metal",
    "huge_pages",
    "mla_decode_attention",
    "mla_cpu_path",
]
__version__ = "0.1.0"
