"""moequant: native INT4 -> MLX requantization and fused MoE kernels for MLX."""

import mlx.core  # noqa: F401  (registers mx.array with nanobind before _ext loads)

from . import int4
from .mlx_lm_patch import patch, patch_linear, unpatch
from .ops import (
    get_num_threads,
    has_metal,
    huge_pages,
    metal_available,
    metal_status,
    mla_cpu_path,
    mla_decode_attention,
    mla_decode_core,
    moe_cpu_path,
    moe_prefill,
    moe_swiglu,
    qgemm_path,
    quantize,
    quantized_linear,
    quantized_multi_linear,
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
    "quantized_multi_linear",
    "qgemm_path",
    "requantize_int4",
    "quantize",
    "get_num_threads",
    "set_num_threads",
    "has_metal",
    "metal_available",
    "metal_status",
    "huge_pages",
    "mla_decode_attention",
    "mla_decode_core",
    "mla_cpu_path",
]
__version__ = "0.1.0"


def _warn_without_metal() -> None:
    """A build whose Metal kernels failed to compile (MOEQUANT_METAL=auto) works on the
    CPU; say so once at import, and on a Mac with a Metal GPU also when the metallib
    is missing for another reason. Plain Linux builds have no Metal by design: silent."""
    import sys
    import warnings

    ok, reason = metal_status()
    if ok:
        return
    failed_build = "failed to compile" in reason
    on_metal_mac = sys.platform == "darwin" and mlx.core.metal.is_available()
    if failed_build or on_metal_mac:
        warnings.warn(
            f"moequant: no Metal kernels, {reason}. CPU ops work; GPU-stream calls raise.",
            RuntimeWarning,
            stacklevel=2,
        )


_warn_without_metal()
