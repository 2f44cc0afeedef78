"""dense_linear: x @ w.T for a float weight, with the bits of MLX's CPU matmul (each
output the sequential float32 sum of the rounded products, then one rounding to the
promoted dtype); against MLX itself, a float64 reference, every CPU path and thread
count, strided inputs and bad arguments."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moequant.ops import dense_linear

FLOATS = (mx.bfloat16, mx.float16, mx.float32)
# MLX's CPU matmul on Linux x86/arm64 builds is the sequential one dense_linear follows;
# macOS uses Accelerate (a different summation order).
MLX_SEQUENTIAL = sys.platform != "darwin"


@pytest.fixture(params=["avx2", "scalar"])
def cpu_path(request, monkeypatch):
    if request.param == "scalar":
        monkeypatch.setenv("MOEQUANT_CPU_PATH", "scalar")
    else:
        monkeypatch.delenv("MOEQUANT_CPU_PATH", raising=False)
    return request.param


def _arrays(rng, M, N, K, xd, wd):
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(xd)
    w = mx.array((rng.standard_normal((N, K)) * 0.05).astype(np.float32)).astype(wd)
    return x, w


def _f64_bound(x, w):
    """|sequential float32 sum - exact| <= K * 2^-24 * sum |x w| (+ the product roundings)."""
    xf = np.array(x.astype(mx.float32), dtype=np.float64)
    wf = np.array(w.astype(mx.float32), dtype=np.float64)
    exact = xf @ wf.T
    K = xf.shape[-1]
    return exact, (K + 1) * 2.0**-24 * (np.abs(xf) @ np.abs(wf).T)


@pytest.mark.parametrize("M,N,K", [(1, 384, 7168), (3, 37, 259), (1, 8, 7), (70, 33, 520), (2, 1, 1)])
def test_equals_mlx_matmul_and_float64(M, N, K, cpu_path):
    rng = np.random.default_rng(M * 1000 + N + K)
    for xd in FLOATS:
        for wd in FLOATS:
            x, w = _arrays(rng, M, N, K, xd, wd)
            y = dense_linear(x, w)
            ref = x @ w.T
            assert y.dtype == ref.dtype and y.shape == ref.shape
            yf = np.array(y.astype(mx.float32))
            if MLX_SEQUENTIAL:
                assert np.array_equal(yf, np.array(ref.astype(mx.float32))), (xd, wd)
            exact, bound = _f64_bound(x, w)
            # Plus the final rounding to a 16-bit result dtype.
            out_eps = {mx.float32: 0.0, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}[y.dtype]
            assert np.all(np.abs(yf - exact) <= bound + out_eps * np.abs(exact) + 1e-30), (xd, wd)


def test_kimi_router_shape_leading_axes_and_threads():
    rng = np.random.default_rng(5)
    x = mx.array(rng.standard_normal((2, 3, 7168)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array((rng.standard_normal((384, 7168)) * 0.02).astype(np.float32)).astype(mx.bfloat16)
    ref = x @ w.T
    outs = []
    old = moequant.get_num_threads()
    try:
        for t in (1, 2, 3, 5):
            moequant.set_num_threads(t)
            outs.append(np.array(dense_linear(x, w).astype(mx.float32)))
    finally:
        moequant.set_num_threads(old)
    assert all(np.array_equal(o, outs[0]) for o in outs)
    assert ref.shape == (2, 3, 384)
    if MLX_SEQUENTIAL:
        assert np.array_equal(outs[0], np.array(ref.astype(mx.float32)))


def test_strided_views_and_1d_x(cpu_path):
    rng = np.random.default_rng(6)
    x, w = _arrays(rng, 6, 40, 96, mx.bfloat16, mx.bfloat16)
    xs = x[::2, 8:72]  # row and column strides
    ws = w.T.T[3:30, 8:72]  # a slice of rows and columns
    wt = mx.array(np.array(w.astype(mx.float32)).T).astype(mx.bfloat16).T  # column-major w
    for a, b in ((xs, ws), (x, wt), (x[1], w)):
        y, ref = dense_linear(a, b), a @ b.T
        assert y.shape == ref.shape
        if MLX_SEQUENTIAL:
            assert np.array_equal(np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32)))


def test_special_values_and_empty(cpu_path):
    x = mx.array([[1.0, -0.0, np.inf, 2.0, 0.0, 1e30, -1e30, 3.0, 5.0]], dtype=mx.float32)
    w = mx.array(np.eye(9, dtype=np.float32)[:7])
    y, ref = dense_linear(x, w), x @ w.T
    np.testing.assert_array_equal(np.array(y), np.array(ref))
    assert dense_linear(mx.zeros((0, 8)), mx.zeros((4, 8))).shape == (0, 4)
    z = dense_linear(mx.ones((2, 0), dtype=mx.bfloat16), mx.ones((3, 0), dtype=mx.bfloat16))
    assert z.dtype == mx.bfloat16 and np.array_equal(np.array(z.astype(mx.float32)), np.zeros((2, 3)))


def test_bad_arguments():
    x = mx.zeros((2, 8))
    with pytest.raises(ValueError, match="dense_linear.*K"):
        dense_linear(x, mx.zeros((4, 9)))
    with pytest.raises(ValueError, match="dense_linear.*w"):
        dense_linear(x, mx.zeros((4, 2, 8)))
    with pytest.raises(ValueError, match="dense_linear.*float"):
        dense_linear(x.astype(mx.int32), mx.zeros((4, 8)))
    with pytest.raises(ValueError, match="dense_linear: w must be an mx.array"):
        dense_linear(x, np.zeros((4, 8)))
