"""Oracles for the INT4 requantization tests: the compressed-tensors packing rules in
numpy, and mx.quantize on the CPU applied to the exact float32 dequantization."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack signed codes q in [-8, 7] (last axis a multiple of 8) into int32 words,
    as compressed-tensors does: nibble u = q + 8, element i of a word at bits 4i."""
    q = np.asarray(q)
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError("codes must lie in [-8, 7]")
    u = (q.astype(np.int64) + 8).astype(np.uint32)
    u = u.reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    words = np.zeros(u.shape[:-1], dtype=np.uint32)
    for k in range(8):
        words |= u[..., k] << np.uint32(4 * k)
    return words.view(np.int32)


def unpack_int4(words: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4: int32/uint32 words -> signed codes (int8)."""
    w = np.asarray(words).view(np.uint32)
    shifts = np.arange(8, dtype=np.uint32) * 4
    u = (w[..., None] >> shifts) & np.uint32(0xF)
    return (u.astype(np.int8) - 8).reshape(*w.shape[:-1], w.shape[-1] * 8)


def dequantize_exact(packed: mx.array, scales: mx.array, src_group_size: int) -> mx.array:
    """W = (u - 8) * float32(scale), each product rounded once in float32."""
    q = unpack_int4(np.array(packed)).astype(np.float32)
    s = np.array(scales.astype(mx.float32))
    s = np.repeat(s, src_group_size, axis=-1)
    return mx.array(q * s)


def oracle(packed, scales, *, bits, group_size=64, src_group_size=32, dtype=None):
    """mx.quantize on the CPU of the exact dequantization; scales and biases rounded
    to dtype (default: the input scales' dtype) afterwards."""
    w = dequantize_exact(packed, scales, src_group_size)
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits, stream=mx.cpu)
    out = dtype or scales.dtype
    return wq, s.astype(out), b.astype(out)


def random_int4(rng, shape_rows, K, src_group_size, scale_dtype, scale=0.02):
    """A random INT4 tensor: packed int32 (..., K/8) and scales (..., K/src_group_size)."""
    q = rng.integers(-8, 8, size=(*shape_rows, K), dtype=np.int8)
    s = (rng.random((*shape_rows, K // src_group_size)) * scale + scale / 10).astype(np.float32)
    return mx.array(pack_int4(q)), mx.array(s).astype(MX_DTYPES[scale_dtype])
