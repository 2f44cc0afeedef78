"""The Metal kernels of mla_decode_attention (metal/mla_attention.metal) on the CPU
emulation of MSL (tests/metal_emulator), against the same float64 oracle as the CPU
op, plus the device bytes the launches read."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mla_reference import mla_decode_reference, rel_err

metal_emulator = pytest.importorskip(
    "metal_emulator", reason="the metal_emulator test package (tests/metal_emulator) is not importable"
)

METAL = Path(__file__).resolve().parents[1] / "metal" / "mla_attention.metal"
SG, TB = 4, 8  # MLA_SG, MLA_TB in metal/mla_attention.h
NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
_LIBS = {}


def lib_for(name):
    if name not in _LIBS:
        _LIBS[name] = metal_emulator.MetalLibrary(str(METAL), only=[name])
    return _LIBS[name]


def host(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.ascontiguousarray(np.array(a))


def run_metal(q_lat, q_pe, lat, pe, scale, bits, gs, chunk, schedule="forward", **kw):
    B, H, R = q_lat.shape
    DR, T = q_pe.shape[2], lat[0].shape[1]
    nc = -(-T // chunk)
    qn, sn = NAMES[q_lat.dtype], NAMES[lat[1].dtype]
    ml = np.full((B, nc, H, 2), np.nan, np.float32)
    acc = np.full((B, nc, H, R), np.nan, np.float32)
    bufs = {0: host(q_lat), 1: host(q_pe)}
    for i, a in enumerate((*lat, *pe)):
        bufs[2 + i] = host(a)
    bufs.update({8: ml, 9: acc, 10: np.uint32(H), 11: np.uint32(T), 12: np.uint32(R),
                 13: np.uint32(DR), 14: np.uint32(gs), 15: np.uint32(chunk),
                 16: np.float32(scale)})
    name = f"mla_decode_partial_{qn}_{sn}_b{bits}"
    ra = lib_for(name).run(name, buffers=bufs, grid=(nc, -(-H // SG), B),
                           threadgroup=(32, SG, 1), schedule=schedule, **kw)
    odt = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[qn]
    out = np.zeros((B, H, R), odt)
    name = f"mla_decode_merge_{qn}"
    rb = lib_for(name).run(name, buffers={0: ml, 1: acc, 2: out, 3: np.uint32(H), 4: np.uint32(R),
                                          5: np.uint32(nc)},
                           grid=(H, B, 1), threadgroup=(32, 1, 1), schedule=schedule, **kw)
    y = mx.array(out).view(mx.bfloat16) if qn == "bfloat16" else mx.array(out)
    return np.array(y.astype(mx.float32)), ra, rb


def case(rng, B, H, T, R, DR, bits, gs, qdtype=mx.float32, sdtype=mx.float32):
    q_lat = mx.array(rng.standard_normal((B, H, R)).astype(np.float32) * 0.3).astype(qdtype)
    q_pe = mx.array(rng.standard_normal((B, H, DR)).astype(np.float32) * 0.3).astype(qdtype)
    lat = mx.quantize(mx.array(rng.standard_normal((B, T, R)).astype(np.float32)).astype(sdtype),
                      group_size=gs, bits=bits)
    pe = mx.quantize(mx.array(rng.standard_normal((B, T, DR)).astype(np.float32)).astype(sdtype),
                     group_size=gs, bits=bits)
    return q_lat, q_pe, lat, pe


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs,R,DR", [(32, 96, 32), (64, 128, 64), (128, 256, 128)])
def test_against_float64(bits, gs, R, DR):
    """Ragged chunks and blocks (T 45, chunks of 16), 6 heads (a partly idle simdgroup),
    two batch rows, two schedules."""
    rng = np.random.default_rng(bits + gs)
    c = case(rng, 2, 6, 45, R, DR, bits, gs)
    ref = mla_decode_reference(*c, 0.15, gs, bits)
    for schedule in ("forward", "reverse"):
        y, _, _ = run_metal(*c, 0.15, bits, gs, chunk=16, schedule=schedule)
        assert rel_err(y, ref) < 2e-5, schedule


@pytest.mark.parametrize("qdtype,sdtype,tol", [(mx.bfloat16, mx.bfloat16, 1e-2),
                                               (mx.float16, mx.float16, 2e-3),
                                               (mx.float32, mx.bfloat16, 2e-5)])
def test_dtypes(qdtype, sdtype, tol):
    rng = np.random.default_rng(11)
    c = case(rng, 1, 4, 20, 64, 64, 8, 64, qdtype, sdtype)
    y, _, _ = run_metal(*c, 0.2, 8, 64, chunk=8, schedule="random")
    assert rel_err(y, mla_decode_reference(*c, 0.2, 64, 8)) < tol


def test_kimi_layout_and_bytes():
    """64 heads, latent 512 + rope 64, 8-bit g64 bf16, 40 positions in 2 chunks. Each
    threadgroup (4 heads) reads its chunk's packed words, scales and biases once."""
    rng = np.random.default_rng(2)
    T, H, R, DR = 40, 64, 512, 64
    c = case(rng, 1, H, T, R, DR, 8, 64, mx.bfloat16, mx.bfloat16)
    y, ra, rb = run_metal(*c, 0.1, 8, 64, chunk=24, count_unique=True)
    assert rel_err(y, mla_decode_reference(*c, 0.1, 64, 8)) < 1e-2
    cache_bytes = sum(int(a.nbytes) for a in (*c[2], *c[3]))
    q_bytes = int(c[0].nbytes + c[1].nbytes)
    # Each head group reads every packed word once and a scale and a bias per word (one
    # per 4 codes: the 64-code groups are re-read 16 times, from cache on a GPU); each
    # of the 2 chunks reads its heads' queries once.
    words = (R + DR) * 8 // 32
    per_group = T * words * 4 + T * words * 2 * 2
    assert ra.unique_bytes_read == cache_bytes + q_bytes
    assert ra.bytes_read == (H // SG) * per_group + 2 * q_bytes
    print(f"\npartial: {ra.bytes_read / 1e6:.2f} MB loaded ({H // SG} head groups x the cache "
          f"{cache_bytes / 1e3:.1f} KB, scales per word), {ra.unique_bytes_read / 1e3:.1f} KB distinct")
