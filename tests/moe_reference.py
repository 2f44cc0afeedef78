"""Oracle for moe_swiglu: MLX's affine bitstream decoded in numpy and the whole MoE
expert computation in float64."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def unpack_codes(wq: np.ndarray, bits: int) -> np.ndarray:
    """uint32 rows (..., K*bits/32) -> codes (..., K): code i at stream bits
    [i*bits, (i+1)*bits), little-endian (mlx-facts section 2). A code spans at most
    two bytes (bits <= 8), so it is read from a 16-bit window at byte i*bits // 8."""
    b = np.ascontiguousarray(wq).view(np.uint8)
    b = np.concatenate([b, np.zeros((*b.shape[:-1], 1), np.uint8)], axis=-1)
    K = (b.shape[-1] - 1) * 8 // bits
    pos = np.arange(K) * bits
    lo = b[..., pos // 8].astype(np.uint16)
    hi = b[..., pos // 8 + 1].astype(np.uint16)
    window = lo | (hi << 8)
    return ((window >> (pos % 8).astype(np.uint16)) & ((1 << bits) - 1)).astype(np.uint8)


def dequantize64(wq: mx.array, scales: mx.array, biases: mx.array, bits: int, gs: int):
    """w = scale * q + bias per group, in float64 (no intermediate rounding)."""
    q = unpack_codes(np.array(wq), bits).astype(np.float64)
    s = np.array(scales.astype(mx.float32)).astype(np.float64)
    b = np.array(biases.astype(mx.float32)).astype(np.float64)
    return q * np.repeat(s, gs, axis=-1) + np.repeat(b, gs, axis=-1)


def make_proj(rng, experts, out_dims, in_dims, bits, gs, sdtype="float32", std=0.05):
    """A stacked-expert projection quantized by mx.quantize:
    (weight, scales, biases, bits, group_size)."""
    w = mx.array(rng.standard_normal((experts, out_dims, in_dims)).astype(np.float32) * std)
    w = w.astype(MX_DTYPES[sdtype])
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits, stream=mx.cpu)
    mx.eval(wq, s, b)
    return (wq, s, b, bits, gs)


def moe_reference(x, indices, scores, gate, up, down) -> np.ndarray:
    """float64 y = sum_j scores_j * Wd[e](silu(Wg[e] x) * (Wu[e] x)), shape of x."""
    xs = np.array(x.astype(mx.float32)).astype(np.float64)
    D = xs.shape[-1]
    xs = xs.reshape(-1, D)
    idx = np.array(indices).reshape(xs.shape[0], -1)
    sc = np.array(scores.astype(mx.float32)).astype(np.float64).reshape(idx.shape)
    used = np.unique(idx)
    u = mx.array(used)
    # Only the experts that are used are dequantized (Kimi-sized tests stay small).
    Wg, Wu, Wd = (
        dict(zip(used, dequantize64(w[u], s[u], b[u], bits, gs))) for w, s, b, bits, gs in (gate, up, down)
    )
    y = np.zeros_like(xs)
    for t in range(xs.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            g = Wg[e] @ xs[t]
            u = Wu[e] @ xs[t]
            h = g / (1.0 + np.exp(-g)) * u
            y[t] += sc[t, j] * (Wd[e] @ h)
    return y.reshape(np.array(x.astype(mx.float32)).shape)


def rel_err(y: mx.array, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| (relative to the output's scale)."""
    yy = np.array(y.astype(mx.float32)).astype(np.float64)
    return float(np.abs(yy - ref).max() / max(np.abs(ref).max(), 1e-30))
