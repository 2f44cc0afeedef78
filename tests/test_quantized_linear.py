"""quantized_linear and the quantized GEMM core (CPU) against a float64 numpy oracle of
the dequantized weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moe_reference import MX_DTYPES, dequantize64

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
MS = (1, 2, 3, 4, 5, 17, 64)
# Relative to max |ref|: float32 outputs a few ulps of the output scale (K up to 7168);
# bf16/f16 outputs their rounding.
TOL = {"float32": 4e-6, "float16": 2e-3, "bfloat16": 1e-2}


def make_weight(rng, N, K, bits, gs, sdtype="float32", std=0.05):
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) * std).astype(MX_DTYPES[sdtype])
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits, stream=mx.cpu)
    mx.eval(wq, s, b)
    return wq, s, b


def reference(x, wq, s, b, bits, gs):
    xs = np.array(x.astype(mx.float32)).astype(np.float64)
    return xs @ dequantize64(wq, s, b, bits, gs).T


def rel_err(y, ref):
    yy = np.array(y.astype(mx.float32)).astype(np.float64)
    return float(np.abs(yy - ref).max() / max(np.abs(ref).max(), 1e-30))


def check(rng, M, N, K, bits, gs, xdtype="float32", sdtype="float32", lead=None):
    wq, s, b = make_weight(rng, N, K, bits, gs, sdtype)
    shape = (*lead, K) if lead else (M, K)
    x = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(MX_DTYPES[xdtype])
    y = moequant.quantized_linear(x, wq, s, b, bits=bits, group_size=gs)
    assert y.shape == (*shape[:-1], N) and y.dtype == x.dtype
    ref = reference(x, wq, s, b, bits, gs)
    err = rel_err(y, ref)
    assert err < TOL[xdtype], (M, N, K, bits, gs, xdtype, sdtype, err)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
def test_bits_groups_rows(bits, gs, cpu_path):
    rng = np.random.default_rng(bits * 1000 + gs)
    # K = 3 * 128 + 2 * gs: K chunks of the GEMM and SIMD blocks end on odd groups; N not a
    # multiple of any tile.
    for M in MS:
        check(rng, M, 53, 384 + 2 * gs, bits, gs)
    # bf16 activations: the integer row kernels keep x at 16 bits (one word level).
    for M in (1, 2):
        check(rng, M, 53, 384 + 2 * gs, bits, gs, "bfloat16", "bfloat16")


@pytest.mark.parametrize("xdtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sdtype", ["float32", "float16", "bfloat16"])
def test_dtypes(xdtype, sdtype, cpu_path):
    rng = np.random.default_rng(7)
    for M in (1, 3, 20):
        check(rng, M, 37, 512, 4, 64, xdtype, sdtype)
        check(rng, M, 19, 320, 6, 32, xdtype, sdtype)


# Kimi-like shapes (K of the attention and dense layers), few output rows to stay fast.
@pytest.mark.parametrize("K,bits", [(7168, 6), (1536, 4), (512, 8), (8192, 6), (2048, 3), (18432, 5)])
def test_kimi_shapes(K, bits, cpu_path):
    rng = np.random.default_rng(K + bits)
    for M in (1, 4, 17):
        check(rng, M, 24, K, bits, 64, "float32")
    check(rng, 2, 11, K, bits, 64, "bfloat16", "bfloat16")


@pytest.mark.parametrize("N", [1, 5, 6, 7, 48, 95, 97, 101])
def test_edge_sizes(N, cpu_path):
    rng = np.random.default_rng(N)
    for M in (1, 8, 9, 16, 33):
        check(rng, M, N, 32, 3, 32)
    check(rng, None, N, 128, 4, 128, lead=(2, 3))
    check(rng, None, N, 64, 2, 64, lead=(5,))


def test_empty_rows():
    rng = np.random.default_rng(0)
    wq, s, b = make_weight(rng, 16, 64, 4, 64)
    y = moequant.quantized_linear(mx.zeros((0, 64)), wq, s, b, bits=4, group_size=64)
    assert y.shape == (0, 16)


def test_matches_mlx_quantized_matmul():
    """The same semantics as mx.quantized_matmul(transpose=True) (float32 everywhere)."""
    rng = np.random.default_rng(3)
    wq, s, b = make_weight(rng, 40, 256, 6, 64)
    x = mx.array(rng.standard_normal((2, 7, 256)).astype(np.float32))
    y = moequant.quantized_linear(x, wq, s, b, bits=6, group_size=64)
    yr = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=6)
    assert y.shape == yr.shape
    assert np.allclose(np.array(y), np.array(yr), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits,gs", [(3, 64), (5, 32), (8, 128)])
def test_gemm_core_ranges(bits, gs, cpu_path):
    """The GEMM core's contract (what the MoE prefill relies on): sub-ranges of W's rows
    and of x's rows, and x rows gathered by index."""
    from moequant import _ext

    rng = np.random.default_rng(bits)
    N, K, M = 77, 3 * gs + 256, 70
    wq, s, b = make_weight(rng, N, K, bits, gs)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32))
    ref = reference(x, wq, s, b, bits, gs)
    for n0, n1, m0, m1 in [(0, N, 0, M), (5, 60, 16, 70), (13, 14, 32, 33), (0, 6, 48, 64)]:
        y = _ext._qgemm(x, wq, s, b, bits, gs, n0, n1, m0, m1)
        assert rel_err(y, ref[m0:m1, n0:n1]) < TOL["float32"]
    rows = np.array([5, 5, 69, 0, 33, 12, 1, 2, 3, 4, 60, 61, 62, 63, 64, 65, 66, 7, 8])
    y = _ext._qgemm(x, wq, s, b, bits, gs, 3, 50, rows=mx.array(rows))
    assert rel_err(y, ref[rows, 3:50]) < TOL["float32"]
    with pytest.raises(ValueError, match="multiple"):
        _ext._qgemm(x, wq, s, b, bits, gs, 0, N, 3, 10)


def test_bad_arguments():
    rng = np.random.default_rng(1)
    wq, s, b = make_weight(rng, 16, 128, 4, 64)
    x = mx.zeros((2, 128))
    ql = moequant.quantized_linear
    cases = [
        (dict(bits=7, group_size=64), "bits"),
        (dict(bits=4, group_size=48), "group_size"),
        (dict(bits=4.0, group_size=64), "bits"),
        (dict(bits=3, group_size=64), "w must have shape"),
        (dict(bits=4, group_size=32), "scales must have shape"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ql(x, wq, s, b, **kw)
    with pytest.raises(ValueError, match="x must be"):
        ql(x.astype(mx.int32), wq, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="x must be"):
        ql(np.zeros((2, 128), np.float32), wq, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="w must be uint32"):
        ql(x, wq.astype(mx.int32), s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="biases must have the dtype"):
        ql(x, wq, s, b.astype(mx.float16), bits=4, group_size=64)
    with pytest.raises(ValueError, match="biases must have shape"):
        ql(x, wq, s, b[:8], bits=4, group_size=64)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        ql(mx.zeros((2, 96)), wq, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="w must have shape"):
        ql(mx.zeros((2, 64)), wq, s, b, bits=4, group_size=64)


@pytest.mark.parametrize("M", [1, 7, 40])
def test_empty_k_gives_zeros(M, cpu_path):
    """K = 0 is an empty sum (mx.quantized_matmul itself crashes on it): zeros, also right
    after a call that leaves results in the kernels' scratch buffers."""
    rng = np.random.default_rng(M)
    wq, s, b = make_weight(rng, 30, 256, 4, 64)
    x = mx.array(rng.standard_normal((M, 256)).astype(np.float32))
    mx.eval(moequant.quantized_linear(x, wq, s, b, bits=4, group_size=64))
    w0, s0 = mx.zeros((30, 0), dtype=mx.uint32), mx.zeros((30, 0))
    y = moequant.quantized_linear(mx.ones((M, 0)), w0, s0, s0, bits=4, group_size=64)
    assert y.shape == (M, 30)
    assert not np.array(y).any()
