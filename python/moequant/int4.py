"""The compressed-tensors INT4 ``pack-quantized`` format (symmetric): numpy helpers.

A weight row of K values is stored as K/8 int32 words; element i of a word sits at bits
[4i, 4i+4) as the nibble u = q + 8 (q in [-8, 7]); its value is q * scale, with one
scale per ``group_size`` consecutive elements.
"""

from __future__ import annotations

import numpy as np

_SHIFTS = np.arange(8, dtype=np.uint32) * np.uint32(4)


def pack(q: np.ndarray) -> np.ndarray:
    """Signed codes (..., K) in [-8, 7], K a multiple of 8 -> int32 words (..., K/8)."""
    q = np.asarray(q)
    if q.shape[-1] % 8:
        raise ValueError(f"the last axis ({q.shape[-1]}) must be a multiple of 8")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError("INT4 codes must lie in [-8, 7]")
    u = (q.astype(np.int32) + 8).astype(np.uint32).reshape(*q.shape[:-1], -1, 8)
    return np.bitwise_or.reduce(u << _SHIFTS, axis=-1).view(np.int32)


def unpack(words: np.ndarray) -> np.ndarray:
    """int32/uint32 words (..., K/8) -> signed codes (..., K) as int8."""
    w = np.ascontiguousarray(words).view(np.uint32)
    u = (w[..., None] >> _SHIFTS) & np.uint32(0xF)
    return (u.astype(np.int8) - 8).reshape(*w.shape[:-1], -1)


def dequantize(words: np.ndarray, scales: np.ndarray, group_size: int = 32) -> np.ndarray:
    """Exact float32 weights: (u - 8) * float32(scale), one rounding per product."""
    q = unpack(words).astype(np.float32)
    s = np.repeat(np.asarray(scales, dtype=np.float32), group_size, axis=-1)
    if s.shape != q.shape:
        raise ValueError(
            f"scales of shape {np.shape(scales)} do not match {q.shape} weights with group_size {group_size}"
        )
    return q * s
