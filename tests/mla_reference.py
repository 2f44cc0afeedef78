"""float64 oracle of MLA decode attention on a dequantized latent cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def dequantize64(w, s, b, group_size, bits) -> np.ndarray:
    """Exact (float64) s * q + b of mx.quantize's codes: unpacked by mx.dequantize with
    unit scales and zero biases (exact small integers), then scaled in float64."""
    ones = mx.ones(s.shape, mx.float32)
    q = np.array(
        mx.dequantize(w, ones, mx.zeros_like(ones), group_size=group_size, bits=bits), dtype=np.float64
    )
    sg, bg = (np.repeat(f64(x), group_size, axis=-1) for x in (s, b))
    return q * sg + bg


def mla_decode_reference(q_lat, q_pe, latent, k_pe, scale, group_size, bits) -> np.ndarray:
    """softmax_t(scale * (q_lat . latent_t + q_pe . pe_t)) @ latent, (B, H, R) float64."""
    lat = dequantize64(*latent, group_size, bits)  # (B, T, R)
    pe = dequantize64(*k_pe, group_size, bits)
    s = scale * (np.einsum("bhr,btr->bht", f64(q_lat), lat) + np.einsum("bhr,btr->bht", f64(q_pe), pe))
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bht,btr->bhr", p, lat)


def make_case(rng, B, H, T, R, DR, bits, gs, qdtype=mx.float32, sdtype=mx.float32, spread=1.0):
    """Random queries (B, H, R) and (B, H, DR), and a (B, T, R) / (B, T, DR) cache
    quantized by mx.quantize: (q_lat, q_pe, latent triple, k_pe triple)."""
    q_lat = mx.array(rng.standard_normal((B, H, R)).astype(np.float32) * spread).astype(qdtype)
    q_pe = mx.array(rng.standard_normal((B, H, DR)).astype(np.float32) * spread).astype(qdtype)
    lat = mx.quantize(
        mx.array(rng.standard_normal((B, T, R)).astype(np.float32)).astype(sdtype), group_size=gs, bits=bits
    )
    pe = mx.quantize(
        mx.array(rng.standard_normal((B, T, DR)).astype(np.float32)).astype(sdtype), group_size=gs, bits=bits
    )
    return q_lat, q_pe, lat, pe


def rel_err(y, ref) -> float:
    y = np.asarray(y, dtype=np.float64)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
