"""moequant.patch's MLA attention (mla_attention): float32 attention on the CPU with the
dense per-head up-projections, expanded (prefill) or absorbed (decode) form, on
matmul_nt and softmax_rows. Oracles: float64 numpy for the two ops; mlx-lm's own
DeepseekV3Attention (float32 activations) for the layer, greedy tokens and logits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache

import moequant
from moequant import mla_attention
from moequant.ops import matmul_nt, softmax_rows
from moequant.testing import tiny_deepseek

PROMPT = mx.array(list(range(40, 52)))  # 12 tokens


def greedy(model, n=12, prompt=PROMPT):
    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n)]


def incremental_logits(model, tokens, first):
    """Logits of a `first`-token prefill then one-token steps, with a prompt cache."""
    cache = make_prompt_cache(model)
    out = [model(tokens[:, :first], cache=cache)]
    for i in range(first, tokens.shape[1]):
        out.append(model(tokens[:, i : i + 1], cache=cache))
    return mx.concatenate(out, axis=1)


# ----------------------------------------------------------------------------- ops


@pytest.mark.parametrize(
    "sa,sb",
    [
        ((7, 5), (13, 5)),
        ((3, 7, 5), (3, 13, 5)),
        ((2, 1, 6, 16), (2, 1, 8, 16)),
        ((4, 33, 64), (4, 17, 64)),
        ((1, 2, 96, 300), (1, 2, 64, 300)),
        ((2, 0, 3), (2, 4, 3)),
        ((2, 3, 0), (2, 4, 0)),
    ],
)
def test_matmul_nt_matches_float64(sa, sb):
    rng = np.random.default_rng(sum(sa) + sum(sb))
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    y = np.array(matmul_nt(mx.array(a), mx.array(b)))
    want = a.astype(np.float64) @ np.swapaxes(b, -1, -2).astype(np.float64)
    assert y.shape == want.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * max(1, sa[-1]) ** 0.5)


def test_matmul_nt_bad_arguments():
    a = mx.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="float32"):
        matmul_nt(a.astype(mx.bfloat16), a)
    with pytest.raises(ValueError, match="leading dimensions"):
        matmul_nt(a, mx.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="last dimensions"):
        matmul_nt(a, mx.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="same number"):
        matmul_nt(a, mx.zeros((3, 4)))


def test_softmax_rows_matches_float64():
    rng = np.random.default_rng(3)
    s = (rng.standard_normal((2, 3, 5, 40)) * 4).astype(np.float32)
    mask = np.arange(5)[:, None] + 35 >= np.arange(40)[None]
    mask[1] = False  # a fully masked row: uniform, as softmax over equal minima
    p = np.array(softmax_rows(mx.array(s), mx.array(mask), scale=0.7))
    x = np.where(mask, s.astype(np.float64) * 0.7, -np.inf)
    x = x - np.where(mask.any(-1, keepdims=True), x.max(-1, keepdims=True), 0)
    e = np.where(mask, np.exp(x), 0)
    want = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    want[..., 1, :] = 1 / 40
    np.testing.assert_allclose(p, want, rtol=2e-6, atol=1e-7)
    p = np.array(softmax_rows(mx.array(s), None, scale=0.3))
    e = np.exp(s * 0.3 - (s * 0.3).max(-1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(-1, keepdims=True), rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="mask must have shape"):
        softmax_rows(mx.array(s), mx.array(mask[:, :39]))
    with pytest.raises(ValueError, match="mask must be bool"):
        softmax_rows(mx.array(s), mx.array(mask.astype(np.float32)))


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("bits,group_size", [(4, 64), (6, 32), (8, 64)])
def test_greedy_and_logits_match_mlx_lm(bits, group_size):
    model, _ = tiny_deepseek.build(seed=21, bits=bits, group_size=group_size)
    tokens = mx.array([list(range(30, 50))])
    want_tokens, want_full = greedy(model), model(tokens)
    want_incr = incremental_logits(model, tokens, 13)
    assert mla_attention.patch_attention(model) == len(model.model.layers)
    assert all(type(l.self_attn).__name__.startswith("MLA") for l in model.model.layers)
    # The 20-token forward (expanded form), a 13-token prefill then decode steps
    # (absorbed form at one token), and greedy generation.
    np.testing.assert_allclose(np.array(model(tokens)), np.array(want_full), atol=3e-5)
    np.testing.assert_allclose(
        np.array(incremental_logits(model, tokens, 13)), np.array(want_incr), atol=3e-5
    )
    assert greedy(model) == want_tokens
    assert moequant.unpatch(model) >= len(model.model.layers)
    assert not any("_moequant_dense" in l.self_attn.__dict__ for l in model.model.layers)
    assert greedy(model, 4) == want_tokens[:4]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_core_same_bits_as_the_chain(monkeypatch, dtype):
    """Decode steps on a float cache run their core as one mla_decode_core per layer,
    with the logits of the op-by-op chain (the core turned off) bit for bit; a 1-token
    cache (S = 1: attend() picks the expanded form) keeps the chain."""
    # g32: the up-projections (dn 32) are quantized too.
    model, _ = tiny_deepseek.build(seed=23, bits=6, group_size=32, dtype=dtype)
    moequant.patch(model)
    tokens = mx.array([list(range(10, 26))])
    real, calls = mla_attention.mla_decode_core, []
    monkeypatch.setattr(mla_attention, "mla_decode_core", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = incremental_logits(model, tokens, 1)
    # A 1-token prefill (S = 1: the chain) then 15 decode steps.
    assert len(calls) == 15 * len(model.model.layers)
    monkeypatch.setattr(mla_attention, "_decode_core", lambda *a: None)
    want = incremental_logits(model, tokens, 1)
    assert got.dtype == dtype and mx.array_equal(got, want).item()


def test_query_chunks_and_forms(monkeypatch):
    """Tiny score chunks (several query chunks per call) and each form forced give
    the same logits."""
    model, _ = tiny_deepseek.build(seed=22)
    tokens = mx.array([list(range(10, 30))])
    want = np.array(incremental_logits(model, tokens, 9))
    moequant.patch(model)
    monkeypatch.setattr(mla_attention, "SCORE_CHUNK_BYTES", 4 * 4 * 20 * 3)
    np.testing.assert_allclose(np.array(incremental_logits(model, tokens, 9)), want, atol=3e-5)
    monkeypatch.setattr(mla_attention, "_absorbed_cost", lambda *a: 0)
    np.testing.assert_allclose(np.array(incremental_logits(model, tokens, 9)), want, atol=3e-5)
    monkeypatch.setattr(mla_attention, "_absorbed_cost", lambda *a: float("inf"))
    np.testing.assert_allclose(np.array(incremental_logits(model, tokens, 9)), want, atol=3e-5)


@pytest.mark.parametrize("L,S", [(11, 11), (7, 12)])
@pytest.mark.parametrize("absorbed", [False, True])
def test_causal_chunks_skip_future_positions(monkeypatch, L, S, absorbed):
    """With mask="causal" each query chunk stops at its last query's position; the
    result equals the full-width attention with the same mask as a boolean array, and
    the float64 reference."""
    rng = np.random.default_rng(L * 31 + S)
    B, H, dn, dr, R, dv = 1, 3, 8, 4, 16, 8
    f = lambda *sh: mx.array(rng.standard_normal(sh).astype(np.float32))
    q_nope, q_pe, lat, kpe, wk, wv = (
        f(B, H, L, dn),
        f(B, H, L, dr),
        f(B, 1, S, R),
        f(B, 1, S, dr),
        f(H, R, dn),
        f(H, dv, R),
    )
    monkeypatch.setattr(mla_attention, "CAUSAL_CHUNK", 3)
    monkeypatch.setattr(
        mla_attention, "_absorbed_cost", (lambda *a: 0) if absorbed else (lambda *a: float("inf"))
    )
    got = np.array(mla_attention.attend(q_nope, q_pe, lat, kpe, wk, wv, 0.3, "causal"))
    allowed = np.arange(S - L, S)[:, None] >= np.arange(S)[None]
    full = np.array(mla_attention.attend(q_nope, q_pe, lat, kpe, wk, wv, 0.3, mx.array(allowed)))
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6)
    # float64: k = latent @ wk, v = latent @ wv^T per head.
    d = lambda a: np.array(a).astype(np.float64)
    k = np.einsum("bsr,hrn->bhsn", d(lat)[:, 0], d(wk))
    v = np.einsum("bsr,hvr->bhsv", d(lat)[:, 0], d(wv))
    s = 0.3 * (
        np.einsum("bhln,bhsn->bhls", d(q_nope), k) + np.einsum("bhld,bsd->bhls", d(q_pe), d(kpe)[:, 0])
    )
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhls,bhsv->bhlv", p, v), rtol=1e-4, atol=1e-5)


def test_patch_switches_and_bf16_dtype():
    """patch(model, linear=False) leaves the attention alone unless attention=True; the
    output keeps the activations' dtype."""
    model, _ = tiny_deepseek.build(seed=23)
    # (The quantized-KV-cache wrapper of moequant.kv_cache may sit on top of either.)
    moequant.patch(model, linear=False)
    assert not isinstance(model.model.layers[0].self_attn, mla_attention._FusedMLA)
    moequant.patch(model, linear=False, attention=True)
    assert isinstance(model.model.layers[0].self_attn, mla_attention._FusedMLA)
    bf, _ = tiny_deepseek.build(seed=23, dtype=mx.bfloat16)
    moequant.patch(bf)
    x = bf.model.embed_tokens(mx.array([[1, 2, 3, 4, 5, 6]]))
    assert bf.model.layers[0].self_attn(x, mask="causal").dtype == mx.bfloat16


def test_weights_replaced_after_patch_are_used():
    model, _ = tiny_deepseek.build(seed=24)
    other, _ = tiny_deepseek.build(seed=25)
    tokens = mx.array([list(range(5, 15))])
    want = np.array(other(tokens))
    moequant.patch(model)
    model(tokens)
    model.update(other.parameters())
    np.testing.assert_allclose(np.array(model(tokens)), want, atol=3e-5)


def test_quantized_kv_cache_goes_to_the_class_below(monkeypatch):
    """A quantized KV cache (mlx-lm's QuantizedKVCache or h14kv's latent one: a ``bits``
    attribute) is not this module's: the call goes to the class below the patch."""
    from mlx_lm.models import deepseek_v3

    model, _ = tiny_deepseek.build(seed=26)
    moequant.patch(model)
    seen = []
    monkeypatch.setattr(
        deepseek_v3.DeepseekV3Attention,
        "__call__",
        lambda self, x, mask=None, cache=None: seen.append(cache) or x,
    )

    class Quantized(KVCache):
        bits = 8

    x = mx.zeros((1, 1, model.args.hidden_size))
    c = Quantized()
    assert model.model.layers[0].self_attn(x, None, c) is x and seen == [c]
    model.model.layers[0].self_attn(x, None, KVCache())
    assert len(seen) == 1


class _AttendCache(KVCache):
    """A cache with the ``attend`` seam (mla_attention's docstring): latent attention
    computed here in float64 numpy, to check what the layer hands over and does with it."""

    calls = 0

    def attend(self, q_latent, q_pe, kv_latent, k_pe, *, scale, mask):
        type(self).calls += 1
        lat, pe = self.update_and_fetch(kv_latent, k_pe)
        q, qp = np.array(q_latent, np.float64), np.array(q_pe, np.float64)
        lat, pe = np.array(lat, np.float64), np.array(pe, np.float64)
        s = scale * (q @ np.swapaxes(lat, -1, -2) + qp @ np.swapaxes(pe, -1, -2))
        if mask is not None:
            s = np.where(np.array(mask), s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        return mx.array(((e / e.sum(-1, keepdims=True)) @ lat).astype(np.float32))


def test_cache_attend_seam():
    model, _ = tiny_deepseek.build(seed=27)
    tokens = mx.array([list(range(60, 75))])
    want = np.array(incremental_logits(model, tokens, 8))
    moequant.patch(model)
    cache = [_AttendCache() for _ in model.model.layers]
    out = [model(tokens[:, :8], cache=cache)]
    for i in range(8, tokens.shape[1]):
        out.append(model(tokens[:, i : i + 1], cache=cache))
    np.testing.assert_allclose(np.array(mx.concatenate(out, axis=1)), want, atol=3e-5)
    assert _AttendCache.calls == len(model.model.layers) * 8


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("yarn", [False, True])
@pytest.mark.parametrize("L,offset", [(1, 0), (1, 9), (5, 3)])
@pytest.mark.parametrize("patched", [False, True])
def test_project_stacked_rope_same_bits(dtype, yarn, L, offset, patched):
    """project() gives mlx-lm's q_nope, q_pe, latent and k_pe bit for bit, with fewer
    view nodes: unpatched (MLX's multi-node rope) it ropes the query heads and the key
    head in one call; patched (moequant's one-node rope) in two; at one position its
    transposes are reshapes. Plain RoPE and YaRN (scaled input, Kimi's rope)."""
    cfg = dict(tiny_deepseek.TINY_CONFIG)
    if yarn:
        cfg["rope_scaling"] = dict(
            type="yarn",
            factor=8.0,
            original_max_position_embeddings=128,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=0.5,
        )
    model, _ = tiny_deepseek.build(cfg, seed=23, dtype=dtype)
    if patched:
        moequant.patch(model)
    attn = model.model.layers[1].self_attn
    assert (getattr(attn.rope, "mscale", 1.0) != 1.0) == yarn
    assert mla_attention._rope_is_one_node(attn.rope) == (patched and not yarn)
    x = mx.random.normal((2, L, cfg["hidden_size"]), key=mx.random.key(5)).astype(dtype)
    q_nope, q_pe, latent, k_pe = mla_attention.project(attn, x, offset)
    # mlx-lm's own steps (DeepseekV3Attention.__call__).
    B, H = 2, attn.num_heads
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.reshape(B, L, H, attn.q_head_dim).transpose(0, 2, 1, 3)
    want_q_nope, want_q_pe = mx.split(q, [attn.qk_nope_head_dim], axis=-1)
    kv_lat, kv_pe = mx.split(attn.kv_a_proj_with_mqa(x), [attn.kv_lora_rank], axis=-1)
    want_latent = mx.expand_dims(attn.kv_a_layernorm(kv_lat), axis=1)
    want_k_pe = kv_pe.reshape(B, L, 1, attn.qk_rope_head_dim).transpose(0, 2, 1, 3)
    for got, want in (
        (q_nope, want_q_nope),
        (latent, want_latent),
        (q_pe, attn.rope(want_q_pe, offset)),
        (k_pe, attn.rope(want_k_pe, offset)),
    ):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert mx.array_equal(got, want).item()


@pytest.mark.parametrize("B", [1, 2])
def test_absorbed_decode_rows_same_bits(monkeypatch, B):
    """attend()'s one-query, unmasked absorbed form (the heads as the products' rows, no
    reshapes) gives each head's output bit for bit as the chunked form does for the same
    query among others (bench_moe's e2e logits are unchanged by it, see RESULTS.md)."""
    rng = np.random.default_rng(B)
    H, dn, dr, R, dv, S = 4, 8, 4, 16, 8, 9
    f = lambda *sh: mx.array(rng.standard_normal(sh).astype(np.float32))
    q_nope, q_pe, lat, kpe, wk, wv = (
        f(B, H, 2, dn),
        f(B, H, 2, dr),
        f(B, 1, S, R),
        f(B, 1, S, dr),
        f(H, R, dn),
        f(H, dv, R),
    )
    monkeypatch.setattr(mla_attention, "_absorbed_cost", lambda *a: 0)
    two = mla_attention.attend(q_nope, q_pe, lat, kpe, wk, wv, 0.3, None)
    for i in range(2):
        one = mla_attention.attend(
            q_nope[:, :, i : i + 1], q_pe[:, :, i : i + 1], lat, kpe, wk, wv, 0.3, None
        )
        assert one.shape == (B, H, 1, dv)
        assert mx.array_equal(one, two[:, :, i : i + 1]).item()


def test_ops_take_evaluated_strided_inputs():
    """matmul_nt, softmax_rows and quantized_linear pass an evaluated row-contiguous
    input as it is (no Contiguous node); evaluated strided views (a transpose, a
    slice with a step) are still copied: the same results as their contiguous copies."""
    rng = np.random.default_rng(3)
    a = mx.array(rng.standard_normal((2, 9, 6)).astype(np.float32))
    b = mx.array(rng.standard_normal((2, 6, 7)).astype(np.float32)).swapaxes(-1, -2)
    s = mx.array(rng.standard_normal((5, 8)).astype(np.float32)).T
    mx.eval(a, b, s)
    assert np.array_equal(np.array(matmul_nt(a, b)), np.array(matmul_nt(a, mx.array(np.array(b)))))
    assert np.array_equal(np.array(softmax_rows(s)), np.array(softmax_rows(mx.array(np.array(s)))))
    w = mx.array(rng.standard_normal((16, 128)).astype(np.float32))
    q = mx.quantize(w, group_size=64, bits=4)
    views = [mx.repeat(t, 2, axis=0)[::2] for t in q]  # strided rows, same values
    mx.eval(views)
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32))
    want = np.array(moequant.quantized_linear(x, *q, bits=4, group_size=64))
    got = np.array(moequant.quantized_linear(x, *views, bits=4, group_size=64))
    assert np.array_equal(got, want)
    np.testing.assert_allclose(
        want, np.array(x) @ np.array(mx.dequantize(*q, group_size=64, bits=4)).T, atol=1e-4
    )
