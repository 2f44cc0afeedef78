"""quantized_multi_linear (one quantized matrix per head, the MLA up-projections) on the
CPU against a float64 numpy oracle of the dequantized weights."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moe_reference import MX_DTYPES, dequantize64, make_proj

# Relative to max |ref| (as tests/test_quantized_linear.py).
TOL = {"float32": 4e-6, "float16": 2e-3, "bfloat16": 1e-2}


def reference(x, wq, s, b, bits, gs):
    xs = np.array(x.astype(mx.float32)).astype(np.float64)
    w = dequantize64(wq, s, b, bits, gs)  # (H, N, K)
    return np.einsum("...hmk,hnk->...hmn", xs, w)


def check(rng, lead, H, M, N, K, bits, gs, xdtype="float32", sdtype="float32"):
    wq, s, b, _, _ = make_proj(rng, H, N, K, bits, gs, sdtype)
    x = mx.array(rng.standard_normal((*lead, H, M, K)).astype(np.float32)).astype(MX_DTYPES[xdtype])
    y = moequant.quantized_multi_linear(x, wq, s, b, bits=bits, group_size=gs)
    assert y.shape == (*lead, H, M, N) and y.dtype == x.dtype
    ref = reference(x, wq, s, b, bits, gs)
    yy = np.array(y.astype(mx.float32)).astype(np.float64)
    err = float(np.abs(yy - ref).max() / max(np.abs(ref).max(), 1e-30))
    assert err < TOL[xdtype], (lead, H, M, N, K, bits, gs, xdtype, sdtype, err)
    return y


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("gs", (32, 64, 128))
def test_bits_groups(bits, gs, cpu_path):
    rng = np.random.default_rng(bits * 100 + gs)
    # N odd and not a multiple of any chunk; K ends on an odd number of groups.
    check(rng, (1,), 3, 1, 37, 2 * 128 + gs, bits, gs)
    check(rng, (2,), 3, 2, 37, 2 * 128 + gs, bits, gs, "bfloat16", "bfloat16")


@pytest.mark.parametrize("xdtype", ("float32", "float16", "bfloat16"))
def test_mla_shapes(xdtype, cpu_path):
    """Kimi's MLA decode products at 6 bits g64 (fewer heads): embed_q (N 512, K 128) on
    q_nope, unembed_out (N 128, K 512) on the attention output."""
    rng = np.random.default_rng(7)
    check(rng, (1,), 4, 1, 512, 128, 6, 64, xdtype, "bfloat16")
    check(rng, (1,), 4, 1, 128, 512, 6, 64, xdtype, "bfloat16")


def test_lead_axes_and_rows():
    """Several leading axes, several rows per head, a non-contiguous x (a transpose)."""
    rng = np.random.default_rng(3)
    check(rng, (2, 1), 3, 3, 40, 128, 4, 64)
    check(rng, (), 2, 5, 16, 64, 3, 32)
    wq, s, b, _, _ = make_proj(rng, 3, 24, 128, 4, 64)
    xt = mx.array(rng.standard_normal((2, 1, 3, 128)).astype(np.float32)).transpose(0, 2, 1, 3)
    y = moequant.quantized_multi_linear(xt, wq, s, b, bits=4, group_size=64)
    ref = reference(xt, wq, s, b, 4, 64)
    assert np.abs(np.array(y) - ref).max() <= 4e-6 * np.abs(ref).max()


@pytest.mark.parametrize("xdtype", ("float32", "bfloat16"))
def test_strided_x(xdtype, cpu_path):
    """x taken through its strides (no Contiguous node in the graph): a transpose (the
    attention output's (B, L, H, d) -> (B, H, L, d)), a slice of the last axis (q_nope
    out of the query projection), a step slice and a broadcast over the batch: the float64
    reference, and array_equal with the same values passed contiguous."""
    rng = np.random.default_rng(13)
    H, N, K = 3, 40, 128
    wq, s, b, _, _ = make_proj(rng, H, N, K, 6, 64, "bfloat16")
    dt = MX_DTYPES[xdtype]

    def arr(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dt)

    views = {  # name: (base, view of it)
        "transpose": (arr(2, 2, H, K), lambda a: a.transpose(0, 2, 1, 3)),
        "last-axis slice": (arr(1, H, 1, K + 64), lambda a: a[..., :K]),
        "step slice": (arr(2, H, 4, K), lambda a: a[:, :, ::2]),
        "broadcast": (arr(1, H, 2, K), lambda a: mx.broadcast_to(a, (3, H, 2, K))),
        "heads reversed": (arr(1, 1, H, 1, K), lambda a: a[:, :, ::-1]),
    }
    f = moequant.quantized_multi_linear
    for name, (base, view) in views.items():
        x = view(base)
        y = f(x, wq, s, b, bits=6, group_size=64)
        ref = reference(x, wq, s, b, 6, 64)
        yy = np.array(y.astype(mx.float32)).astype(np.float64)
        assert y.shape == x.shape[:-1] + (N,) and y.dtype == x.dtype, name
        assert np.abs(yy - ref).max() <= TOL[xdtype] * np.abs(ref).max(), name
        xc = mx.array(np.array(x.astype(mx.float32))).astype(dt)  # the same values, contiguous
        yc = f(xc, wq, s, b, bits=6, group_size=64)
        assert np.array_equal(np.array(y.astype(mx.float32)), np.array(yc.astype(mx.float32))), name
        # The view of an unevaluated x (the decode graph's case: x's producer runs first).
        y2 = f(view(base * 1), wq, s, b, bits=6, group_size=64)
        assert np.array_equal(np.array(y2.astype(mx.float32)), np.array(yc.astype(mx.float32))), name


def test_strided_x_adds_no_nodes(tmp_path):
    """A strided x (the attention output's transpose) costs the graph no Contiguous or
    Reshape node: the op is one node on top of x's producer."""
    rng = np.random.default_rng(17)
    wq, s, b, _, _ = make_proj(rng, 2, 16, 64, 4, 32)
    a = mx.array(rng.standard_normal((1, 1, 2, 64)).astype(np.float32))
    x = a + a  # unevaluated
    y = moequant.quantized_multi_linear(x.transpose(0, 2, 1, 3), wq, s, b, bits=4, group_size=32)
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), y)
    prims = re.findall(r'label ="(\w+)", shape=rectangle', dot.read_text())
    assert sorted(prims) == ["Add", "MoequantQuantizedMultiLinear", "Transpose"], prims


def test_matches_quantized_linear_per_head():
    """Head h is quantized_linear on matrix h, bit for bit (the same row kernels)."""
    rng = np.random.default_rng(5)
    wq, s, b, _, _ = make_proj(rng, 4, 96, 256, 6, 64, "bfloat16")
    x = mx.array(rng.standard_normal((1, 4, 1, 256)).astype(np.float32)).astype(mx.bfloat16)
    y = moequant.quantized_multi_linear(x, wq, s, b, bits=6, group_size=64)
    for h in range(4):
        yh = moequant.quantized_linear(x[0, h], wq[h], s[h], b[h], bits=6, group_size=64)
        assert np.array_equal(np.array(y[0, h].astype(mx.float32)), np.array(yh.astype(mx.float32)))


def test_thread_count_invariance(cpu_path):
    rng = np.random.default_rng(11)
    wq, s, b, _, _ = make_proj(rng, 6, 200, 256, 6, 64)
    x = mx.array(rng.standard_normal((1, 6, 2, 256)).astype(np.float32))
    outs = []
    try:
        for n in (1, 2, 3, 5):
            moequant.set_num_threads(n)
            outs.append(np.array(moequant.quantized_multi_linear(x, wq, s, b, bits=6, group_size=64)))
    finally:
        moequant.set_num_threads(0)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_empty_k_gives_zeros():
    w0, s0 = mx.zeros((2, 5, 0), dtype=mx.uint32), mx.zeros((2, 5, 0))
    y = moequant.quantized_multi_linear(mx.ones((1, 2, 3, 0)), w0, s0, s0, bits=4, group_size=64)
    assert y.shape == (1, 2, 3, 5) and not np.array(y).any()


def test_bad_arguments():
    rng = np.random.default_rng(1)
    wq, s, b, _, _ = make_proj(rng, 2, 16, 128, 4, 64)
    x = mx.zeros((1, 2, 1, 128))
    f = moequant.quantized_multi_linear
    cases = [
        (dict(bits=7, group_size=64), "bits"),
        (dict(bits=4, group_size=48), "group_size"),
        (dict(bits=4.0, group_size=64), "bits"),
        (dict(bits=3, group_size=64), "w must have shape"),
        (dict(bits=4, group_size=32), "scales must have shape"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            f(x, wq, s, b, **kw)
    with pytest.raises(ValueError, match="heads axis"):
        f(mx.zeros((1, 3, 1, 128)), wq, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., H, M, K\)"):
        f(mx.zeros((2, 128)), wq, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="x must be"):
        f(x.astype(mx.int32), wq, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="x must be an mx.array"):
        f(np.zeros((1, 2, 1, 128), np.float32), wq, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="w must have shape \\(H, N"):
        f(x, wq[0], s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="biases must have the dtype"):
        f(x, wq, s, b.astype(mx.float16), bits=4, group_size=64)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        f(mx.zeros((1, 2, 1, 96)), wq, s, b, bits=4, group_size=64)


def test_matches_mlx_quantized_matmul():
    """The op is mx.quantized_matmul(..., transpose=True) on a stacked weight."""
    rng = np.random.default_rng(9)
    wq, s, b, _, _ = make_proj(rng, 3, 64, 128, 6, 64)
    x = mx.array(rng.standard_normal((1, 3, 1, 128)).astype(np.float32))
    y = moequant.quantized_multi_linear(x, wq, s, b, bits=6, group_size=64)
    ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=6, stream=mx.cpu)
    assert np.allclose(np.array(y), np.array(ref), rtol=1e-5, atol=1e-5 * float(mx.abs(ref).max()))
