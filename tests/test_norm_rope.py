"""moequant's rms_norm and rope primitives (csrc/norm_rope): bit-identical to
mx.fast.rms_norm / mx.fast.rope on the CPU stream (MLX 0.32 runs their fallback graphs
there), close to float64 references, and routed in by moequant.patch (nn.RMSNorm,
nn.RoPE, mlx-lm's YarnRoPE) with greedy tokens unchanged."""

from __future__ import annotations

import collections
import os
import re
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import moequant
from moequant.ops import rms_norm, rope
from moequant.testing import tiny_deepseek

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
TOL = {mx.float32: 1e-5, mx.bfloat16: 2e-2, mx.float16: 2e-3}


def _x(rng, shape, dtype, scale=3.0):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b, equal_nan=True).item()


def graph_nodes(y):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.dot")
        mx.export_to_dot(path, y)
        return collections.Counter(re.findall(r'label ="(\w+)", shape=rectangle', Path(path).read_text()))


# ----------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [7168, 1536, 512, 33, 1])
@pytest.mark.parametrize("wdtype", [None, "same", mx.float32])
def test_rms_norm_bits_equal_mlx(dtype, D, wdtype):
    rng = np.random.default_rng(D)
    x = _x(rng, (2, 3, D), dtype)
    w = None if wdtype is None else _x(rng, (D,), dtype if wdtype == "same" else wdtype, 1.0)
    for eps in (1e-6, 1e-5, 0.5):
        want = mx.fast.rms_norm(x, w, eps)
        got = rms_norm(x, w, eps)
        assert _same(got, want), (dtype, D, wdtype, eps)
    # against float64
    xf = np.array(x.astype(mx.float32)).astype(np.float64)
    ref = xf / np.sqrt((xf**2).mean(-1, keepdims=True) + 1e-6)
    if w is not None:
        ref = ref * np.array(w.astype(mx.float32)).astype(np.float64)
    got = np.array(rms_norm(x, w, 1e-6).astype(mx.float32))
    tol = TOL[mx.float32 if want.dtype == mx.float32 else dtype]
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_rms_norm_strided_inputs_and_one_node():
    """A slice, a transpose and a strided weight give mx.fast's bits (copied at eval,
    no extra node); a CPU call is one primitive where MLX's fallback is 12."""
    rng = np.random.default_rng(1)
    base = _x(rng, (4, 300), mx.bfloat16)
    wb = _x(rng, (512,), mx.bfloat16, 1.0)
    mx.eval(base, wb)
    for x, w in ((base[:, 10:266], wb[::2]), (base.T, None), (base[::2, ::3], wb[:100])):
        assert _same(rms_norm(x, w, 1e-6), mx.fast.rms_norm(x, w, 1e-6))
    x = _x(rng, (1, 1, 2048), mx.bfloat16)
    w = _x(rng, (2048,), mx.bfloat16, 1.0)
    mx.eval(x, w)
    assert graph_nodes(rms_norm(x, w, 1e-6)) == {"MoequantRMSNorm": 1}
    assert sum(graph_nodes(mx.fast.rms_norm(x, w, 1e-6)).values()) > 5


def test_rms_norm_bad_arguments_and_other_dtypes():
    x = mx.zeros((2, 8))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, mx.zeros((7,)), 1e-6)
    with pytest.raises(ValueError, match="rms_norm"):
        rms_norm(np.zeros((2, 8)), None, 1e-6)
    # Zeros and huge values: MLX's results (0 * inf, overflow) bit for bit.
    for v in (0.0, 3e38, -1e-30):
        x = mx.full((3, 16), v)
        assert _same(rms_norm(x, None, 1e-6), mx.fast.rms_norm(x, None, 1e-6))


# ----------------------------------------------------------------------------- rope


def _rope64(x, dims, traditional, base, scale, offset, freqs=None):
    x = np.array(x.astype(mx.float32)).astype(np.float64)
    T = x.shape[-2]
    half = dims // 2
    inv = 1.0 / freqs.astype(np.float64) if freqs is not None else base ** (-np.arange(half) / half)
    theta = ((np.arange(T) + offset) * scale)[:, None] * inv[None]
    c, s = np.cos(theta), np.sin(theta)
    out = x.copy()
    i1 = np.arange(0, dims, 2) if traditional else np.arange(half)
    i2 = i1 + 1 if traditional else i1 + half
    x1, x2 = x[..., i1], x[..., i2]
    out[..., i1] = x1 * c - x2 * s
    out[..., i2] = x1 * s + x2 * c
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 17, 1, 32), (2, 3, 7, 64), (2, 5, 48), (1, 2, 3, 4, 80)])
@pytest.mark.parametrize("traditional", [True, False])
def test_rope_bits_equal_mlx(dtype, shape, traditional):
    rng = np.random.default_rng(sum(shape))
    x = _x(rng, shape, dtype, 1.0)
    for dims in (32, shape[-1]):
        for offset in (0, 3, 1000):
            for base, scale in ((10000.0, 1.0), (500.0, 0.25)):
                kw = dict(traditional=traditional, base=base, scale=scale, offset=offset)
                got = rope(x, dims, **kw)
                assert _same(got, mx.fast.rope(x, dims, **kw)), (dims, offset, base, scale)
                ref = _rope64(x, dims, traditional, base, scale, offset)
                tol = TOL[dtype] * 4 if dtype != mx.float32 else 2e-4
                np.testing.assert_allclose(np.array(got.astype(mx.float32)), ref, atol=tol)
        freqs = mx.array(
            (10000 ** (np.arange(0, dims, 2) / dims) * rng.uniform(1, 3, dims // 2)).astype(np.float32)
        )
        kw = dict(traditional=traditional, base=None, scale=1.0, offset=7, freqs=freqs)
        got = rope(x, dims, **kw)
        assert _same(got, mx.fast.rope(x, dims, **kw))
        ref = _rope64(x, dims, traditional, None, 1.0, 7, np.array(freqs))
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), ref, atol=TOL[dtype] * 4)


def test_rope_offsets_strides_and_errors():
    rng = np.random.default_rng(7)
    x = _x(rng, (3, 4, 5, 40), mx.bfloat16, 1.0)
    mx.eval(x)
    for off in (mx.array(9), mx.array([0, 5, 9]), mx.array([2], dtype=mx.int64)):
        kw = dict(traditional=True, base=1e4, scale=1.0, offset=off)
        assert _same(rope(x, 32, **kw), mx.fast.rope(x, 32, **kw))
    # strided views: a head slice and a transposed (B, H, T, D) of a (B, T, H, D) tensor
    for v in (x[:, 1:3], x.transpose(0, 2, 1, 3), x[..., ::2, :]):
        kw = dict(traditional=False, base=1e4, scale=1.0, offset=4)
        assert _same(rope(v, 32, **kw), mx.fast.rope(v, 32, **kw))
    assert graph_nodes(rope(x, 32, traditional=True, base=1e4, scale=1.0, offset=3)) == {"MoequantRoPE": 1}
    with pytest.raises(ValueError, match="dims"):
        rope(x, 33, traditional=True, base=1e4, scale=1.0, offset=0)
    with pytest.raises(ValueError, match="offset"):
        rope(x, 32, traditional=True, base=1e4, scale=1.0, offset=1.5)
    with pytest.raises(ValueError, match="freqs"):
        rope(x, 32, traditional=True, base=None, scale=1.0, offset=0, freqs=mx.ones((3,)))


# ----------------------------------------------------------------------------- patch


YARN = dict(
    type="yarn",
    factor=8.0,
    original_max_position_embeddings=128,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=0.5,
)


@pytest.mark.parametrize("yarn", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_patched_layers_bits_equal(yarn, dtype):
    """After moequant.patch the model's RMSNorm and rope layers run the primitives and
    give mlx-lm's bits (YaRN with mscale != 1 included); unpatch restores the classes."""
    cfg = dict(tiny_deepseek.TINY_CONFIG)
    if yarn:
        cfg["rope_scaling"] = dict(YARN)
    model, _ = tiny_deepseek.build(cfg, seed=3, dtype=dtype)
    attn = model.model.layers[1].self_attn
    assert (getattr(attn.rope, "mscale", 1.0) != 1.0) == yarn
    rng = np.random.default_rng(2)
    q = _x(rng, (2, 4, 5, attn.qk_rope_head_dim), dtype, 1.0)
    h = _x(rng, (2, 5, cfg["hidden_size"]), dtype)
    norm = model.model.layers[0].input_layernorm
    want = [attn.rope(q, 6), norm(h), attn.kv_a_layernorm(h[..., : attn.kv_lora_rank])]
    moequant.patch(model)
    assert type(norm).__name__ == "FusedRMSNorm"
    assert type(attn.rope).__name__.startswith("Fused")
    got = [attn.rope(q, 6), norm(h), attn.kv_a_layernorm(h[..., : attn.kv_lora_rank])]
    for g, w in zip(got, want):
        assert _same(g, w)
    assert graph_nodes(norm(h)) == {"MoequantRMSNorm": 1}
    moequant.unpatch(model)
    assert type(norm) is nn.RMSNorm


# ----------------------------------------------------------------------------- embedding, glue


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_embedding_bits_equal_mlx(dtype, bits, group_size):
    from moequant.ops import quantized_embedding

    rng = np.random.default_rng(bits * group_size)
    V, K = 37, 256
    emb = nn.QuantizedEmbedding(V, K, group_size=group_size, bits=bits)
    table = _x(rng, (V, K), dtype, 0.05)
    emb.weight, emb.scales, emb.biases = mx.quantize(table, group_size=group_size, bits=bits)
    ids = mx.array(rng.integers(0, V, (2, 5)).astype(np.int32))
    got = quantized_embedding(ids, emb.weight, emb.scales, emb.biases, bits=bits, group_size=group_size)
    assert _same(got, emb(ids))
    # float64: scale * code + bias from the unpacked codes
    codes = np.array(
        mx.dequantize(
            emb.weight,
            mx.ones_like(emb.scales, dtype=mx.float32),
            mx.zeros_like(emb.biases, dtype=mx.float32),
            group_size=group_size,
            bits=bits,
        )
    )
    s64 = np.repeat(np.array(emb.scales.astype(mx.float32)).astype(np.float64), group_size, -1)
    b64 = np.repeat(np.array(emb.biases.astype(mx.float32)).astype(np.float64), group_size, -1)
    ref = (codes * s64 + b64)[np.array(ids)]
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)), ref, atol=TOL[dtype] * 0.1 + 1e-6, rtol=TOL[dtype]
    )
    # negative ids count from the end, int64 ids, strided ids; one graph node
    for i in (mx.array([-1, 0, -V]), mx.array([[3, 4]], dtype=mx.int64), ids.T, ids[:, ::2]):
        assert _same(
            quantized_embedding(i, emb.weight, emb.scales, emb.biases, bits=bits, group_size=group_size),
            emb(i),
        )
    assert graph_nodes(
        quantized_embedding(ids, emb.weight, emb.scales, emb.biases, bits=bits, group_size=group_size)
    ) == {"MoequantQuantizedEmbedding": 1}


def test_quantized_embedding_bad_arguments():
    from moequant.ops import quantized_embedding

    w, s, b = mx.quantize(mx.zeros((8, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError, match="ids"):
        quantized_embedding(mx.zeros((2,)), w, s, b, bits=4, group_size=32)
    with pytest.raises(ValueError, match="scales"):
        quantized_embedding(mx.array([1]), w, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="bits"):
        quantized_embedding(mx.array([1]), w, s, b, bits=7, group_size=32)
    # an id outside the table reads nothing outside it: a row of NaN
    assert np.isnan(np.array(quantized_embedding(mx.array([8, -9]), w, s, b, bits=4, group_size=32))).all()


def test_ops_take_strided_unevaluated_inputs_without_nodes():
    """quantized_linear, matmul_nt and softmax_rows take x of any rank and strides as it
    is (one node, no Reshape/Contiguous around it) and copy a strided view at eval time:
    the same bits as on a contiguous copy."""
    from moequant.ops import matmul_nt, quantized_linear, softmax_rows

    rng = np.random.default_rng(4)
    wq, ws, wb = mx.quantize(_x(rng, (48, 128), mx.float32, 0.1), group_size=64, bits=4)
    base = _x(rng, (3, 128, 4), mx.float32)
    mx.eval(wq, ws, wb, base)
    for x in (base.transpose(0, 2, 1), (base + 1).transpose(0, 2, 1)[:, ::2]):
        y = quantized_linear(x, wq, ws, wb, bits=4, group_size=64)
        assert sum(graph_nodes(y).values()) - sum(graph_nodes(x).values()) == 1
        assert _same(y, quantized_linear(mx.array(np.array(x)), wq, ws, wb, bits=4, group_size=64))
    a = _x(rng, (2, 3, 16, 5), mx.float32).swapaxes(-1, -2)
    b = _x(rng, (2, 3, 14, 16), mx.float32)[..., ::2, :]
    y = matmul_nt(a + 0, b)
    assert graph_nodes(y)["MoequantMatmulNT"] == 1 and "Contiguous" not in graph_nodes(y)
    assert _same(y, matmul_nt(mx.array(np.array(a)), mx.array(np.array(b))))
    s = _x(rng, (2, 9, 4), mx.float32).swapaxes(-1, -2)
    assert _same(softmax_rows(s, scale=0.5), softmax_rows(mx.array(np.array(s)), scale=0.5))
