"""Python-facing ops. Arguments are validated in C++ when the graph is built."""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from . import _ext

has_metal: bool = bool(_ext.has_metal)


def requantize_int4(
    packed: mx.array,
    scales: mx.array,
    *,
    bits: int,
    group_size: int = 64,
    src_group_size: int = 32,
    dtype: Optional[mx.Dtype] = None,
    stream=None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Re-quantize compressed-tensors INT4 weights to MLX's affine format in one pass.

    ``packed`` (int32 or uint32, shape ``(..., K/8)``) holds eight 4-bit codes per word,
    lowest bits first, stored as ``q + 8``; ``scales`` (``(..., K/src_group_size)``,
    float32/float16/bfloat16) gives the source weight ``(u - 8) * scale``.

    Returns ``(wq, scales, biases)`` as ``mx.quantize(W, group_size, bits)`` would on the
    CPU for ``W = (u - 8) * float32(scale)``, bit for bit; scales and biases are then
    rounded to ``dtype`` (default: the dtype of the input scales).
    """
    return _ext.requantize_int4(
        packed,
        scales,
        bits=bits,
        group_size=group_size,
        src_group_size=src_group_size,
        dtype=dtype,
        stream=stream,
    )


def get_num_threads() -> int:
    """Threads the CPU kernels use (``MOEQUANT_NUM_THREADS`` or the core count)."""
    return _ext.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the CPU kernels' thread count; ``n <= 0`` restores the default."""
    _ext.set_num_threads(int(n))
