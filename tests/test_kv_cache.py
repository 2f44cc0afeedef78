"""The quantized MLA latent KV cache (moequant.kv_cache) in mlx-lm's generation: the
upstream crash it fixes, logits against mlx-lm's own attention on the dequantized
cache, greedy decode, quantized_kv_start, prompt-cache save/load, trim, bytes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

import moequant
from moequant import kv_cache
from moequant.kv_cache import MLAKVCache, MLAQuantizedKVCache, bytes_per_token
from moequant.testing import tiny_deepseek

# The tiny DeepSeek-V3 with cache dims that group sizes divide (latent 128, rope 64).
KV_CONFIG = dict(tiny_deepseek.TINY_CONFIG, kv_lora_rank=128, qk_rope_head_dim=64)
PROMPT = mx.array([(5 * i) % 300 + 10 for i in range(30)])


@pytest.fixture(scope="module")
def built():
    model, cfg = tiny_deepseek.build(KV_CONFIG, seed=3)
    return model, cfg


def greedy(model, n=12, prompt=PROMPT, **kw):
    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, **kw)]


class DequantizedKVCache(KVCache):
    """Oracle: mlx-lm's own KVCache holding quantize->dequantize of what it is given
    (float32), so mlx-lm's own attention computes attention on the dequantized cache."""

    def __init__(self, bits, group_size):
        super().__init__()
        # Not named bits/group_size: mlx-lm's attention takes a cache with `bits` for its
        # own quantized cache.
        self.q = dict(group_size=group_size, bits=bits)

    def update_and_fetch(self, keys, values):
        rt = [mx.dequantize(*mx.quantize(a, **self.q), **self.q).astype(mx.float32) for a in (keys, values)]
        return super().update_and_fetch(*rt)


def test_mlx_lm_alone_crashes_with_kv_bits(built):
    """The upstream bug this fixes (mlx-lm 0.32.2): kv_bits on DeepSeek-V3 crashes."""
    model, cfg = tiny_deepseek.build(KV_CONFIG, seed=3)
    with pytest.raises(AttributeError, match="swapaxes"):
        greedy(model, 3, kv_bits=8, quantized_kv_start=0)


@pytest.mark.parametrize("bits,gs", [(8, 64), (4, 64), (8, 32), (4, 32)])
def test_attention_matches_mlx_lm_on_dequantized_cache(built, bits, gs):
    """One MLA layer: a 30-token prefill (several query tokens against the quantized
    cache, chunked dequantization) then 3 decode steps (the fused kernel), outputs
    against mlx-lm's own attention on a cache holding the dequantized values."""
    from mlx_lm.models.base import create_causal_mask

    model, cfg = built
    moequant.patch(model)
    attn = model.model.layers[1].self_attn
    ours, ref = MLAQuantizedKVCache(group_size=gs, bits=bits), DequantizedKVCache(bits, gs)
    rng = np.random.default_rng(bits + gs)
    x = mx.array(rng.standard_normal((1, 30, cfg["hidden_size"])).astype(np.float32))
    mask = create_causal_mask(30)
    for step in range(4):
        a, b = np.array(attn(x, mask, cache=ours)), np.array(attn(x, mask, cache=ref))
        assert np.abs(a - b).max() < 2e-5 * np.abs(b).max(), step
        x = mx.array(rng.standard_normal((1, 1, cfg["hidden_size"])).astype(np.float32))
        mask = None
    assert ours.offset == 33


@pytest.mark.parametrize("mask_dtype", [mx.bool_, mx.float32])
def test_decode_honours_an_explicit_mask(built, mask_dtype):
    """A decode step with an explicit mask (a batch's left padding: the first positions
    hidden) against mlx-lm's attention on the dequantized cache with the same mask, and
    not equal to the unmasked step: the mask is applied, not dropped."""
    model, cfg = built
    moequant.patch(model)
    attn = model.model.layers[1].self_attn
    ours, ref = MLAQuantizedKVCache(group_size=64, bits=8), DequantizedKVCache(8, 64)
    rng = np.random.default_rng(11)
    x = mx.array(rng.standard_normal((1, 20, cfg["hidden_size"])).astype(np.float32))
    attn(x, "causal", cache=ours), attn(x, "causal", cache=ref)
    x = mx.array(rng.standard_normal((1, 1, cfg["hidden_size"])).astype(np.float32))
    keep = mx.arange(21)[None] >= 6  # (1, 21): positions 0..5 are padding
    mask = keep if mask_dtype == mx.bool_ else mx.where(keep, 0.0, -1e9).astype(mask_dtype)
    a, b = np.array(attn(x, mask, cache=ours)), np.array(attn(x, mask, cache=ref))
    assert np.abs(a - b).max() < 2e-5 * np.abs(b).max()
    ours.trim(1)
    unmasked = np.array(attn(x, None, cache=ours))
    assert np.abs(unmasked - b).max() > 1e-3 * np.abs(b).max()


@pytest.mark.parametrize("bits", [8, 4])
def test_model_logits_close_to_dequantized_reference(built, bits):
    """The whole model (3 layers, MoE routing amplifies float noise) with the quantized
    cache against mlx-lm's attention on the dequantized cache: logits agree closely."""
    model, _ = built
    moequant.patch(model)
    ours = [MLAQuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]
    ref = [DequantizedKVCache(bits, 64) for _ in model.layers]
    tokens = PROMPT[None]
    for step in range(4):
        a, b = np.array(model(tokens, cache=ours)[:, -1]), np.array(model(tokens, cache=ref)[:, -1])
        assert np.abs(a - b).max() < 1e-3 * np.abs(b).max(), step
        assert np.argmax(a) == np.argmax(b)
        tokens = mx.array([[int(np.argmax(b))]])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("fused", [True, False])
def test_greedy_decode(bits, fused):
    model, _ = tiny_deepseek.build(KV_CONFIG, seed=3)
    want = greedy(model)
    if fused:
        moequant.patch(model)
    else:
        kv_cache.patch_kv_cache(model)
    assert isinstance(make_prompt_cache(model)[0], MLAKVCache)
    assert greedy(model) == want  # fp16 cache: mlx-lm's own attention
    cache = make_prompt_cache(model)
    got = greedy(model, prompt_cache=cache, kv_bits=bits, quantized_kv_start=0)
    assert all(isinstance(c, MLAQuantizedKVCache) and c.bits == bits for c in cache)
    # The prompt itself runs before the switch (mlx-lm quantizes after a call).
    assert len(got) == 12 and got[0] == want[0]
    if bits == 8:
        assert got == want  # the tiny model's logits are peaked enough
    # Quantized from the first token on: mlx-lm's attention on the dequantized cache
    # decodes the same tokens.
    ours = greedy(model, prompt_cache=[MLAQuantizedKVCache(64, bits) for _ in model.layers])
    assert ours == greedy(model, prompt_cache=[DequantizedKVCache(bits, 64) for _ in model.layers])


def test_quantized_kv_start(built):
    model, _ = built
    moequant.patch(model)
    cache = make_prompt_cache(model)
    steps = generate_step(
        PROMPT,
        model,
        max_tokens=12,
        prompt_cache=cache,
        kv_bits=8,
        quantized_kv_start=35,
        prefill_step_size=16,
    )
    kinds = []
    for _ in steps:
        kinds.append((cache[0].offset, type(cache[0]).__name__))
    # Stays fp16 until the offset reaches 35 after a step, then 8-bit.
    assert all(k == "MLAKVCache" for o, k in kinds if o < 35)
    assert kinds[-1][1] == "MLAQuantizedKVCache"


def test_save_load_round_trip(built, tmp_path):
    model, _ = built
    moequant.patch(model)
    cache = [MLAQuantizedKVCache(group_size=64, bits=8) for _ in model.layers]
    tok = int(mx.argmax(model(PROMPT[None], cache=cache)[0, -1]))
    f = tmp_path / "c.safetensors"
    save_prompt_cache(str(f), cache, {"model": "tiny"})
    loaded, meta = load_prompt_cache(str(f), return_metadata=True)
    assert meta == {"model": "tiny"}
    assert [type(c) for c in loaded] == [MLAQuantizedKVCache] * len(cache)
    for a, b in zip(loaded, cache):
        assert (a.offset, a.bits, a.group_size) == (b.offset, b.bits, b.group_size) == (30, 8, 64)
        for x, y in zip(a.state[0] + a.state[1], b.state[0] + b.state[1]):
            assert mx.array_equal(x, y)
    # Registered by name where mlx-lm's loader looks.
    assert mlx_cache.MLAQuantizedKVCache is MLAQuantizedKVCache
    rest = greedy(model, 8, prompt=mx.array([tok]), prompt_cache=loaded)
    assert rest == greedy(model, 8, prompt=mx.array([tok]), prompt_cache=cache)
    # The same as one uninterrupted run with an 8-bit cache from the start.
    fresh = [MLAQuantizedKVCache(group_size=64, bits=8) for _ in model.layers]
    assert greedy(model, 9, prompt_cache=fresh) == [tok] + rest


def test_fp16_mla_cache_round_trip(built, tmp_path):
    model, _ = built
    moequant.patch(model)
    cache = make_prompt_cache(model)
    greedy(model, 2, prompt_cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert type(loaded[0]) is MLAKVCache and loaded[0].offset == cache[0].offset


def test_trim(built):
    """Trimming k tokens then feeding them again gives the same logits (speculative
    decoding's rollback)."""
    model, _ = built
    moequant.patch(model)
    cache = [MLAQuantizedKVCache(group_size=64, bits=4) for _ in model.layers]
    model(PROMPT[None], cache=cache)
    extra = mx.array([[11, 12, 13]])
    want = np.array(model(extra, cache=cache))
    assert all(c.is_trimmable() for c in cache)
    assert mlx_cache.trim_prompt_cache(cache, 3) == 3 and cache[0].offset == 30
    got = np.array(model(extra, cache=cache))
    assert np.array_equal(got, want)


def test_bytes_match_formula(built):
    model, _ = built
    moequant.patch(model)
    R, DR = KV_CONFIG["kv_lora_rank"], KV_CONFIG["qk_rope_head_dim"]
    for bits in (8, 4):
        cache = [MLAQuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]
        model(mx.array([list(range(10, 10 + 256))]), cache=cache)  # one full step of 256
        mx.eval([c.state for c in cache])
        # float32 model: 4-byte scales and biases.
        per = bytes_per_token(R, DR, bits, 64, dtype_bytes=4)
        assert cache[0].nbytes == 256 * per
        model(mx.array([[5, 6, 7]]), cache=cache)
        lat, pe, n, *_ = cache[0].state
        assert n == 259 and sum(a.nbytes for a in lat + pe) == 259 * per
    assert bytes_per_token(512, 64) * 61 == 70272  # Kimi, bf16: 68.6 KiB per token
    assert bytes_per_token(512, 64, 8, 64) == 612 and bytes_per_token(512, 64, 4, 64) == 324


def test_group_size_that_does_not_divide_the_rope_dim():
    """The default tiny fixture's rope part has 16 values: a clear error naming it."""
    model, _ = tiny_deepseek.build(seed=1)
    moequant.patch(model)
    with pytest.raises(ValueError, match="qk_rope_head_dim 16"):
        greedy(model, 2, kv_bits=8, quantized_kv_start=0)
    with pytest.raises(ValueError, match="kv_bits must be 4 or 8"):
        MLAQuantizedKVCache(bits=3)


def test_unpatch_restores(built):
    model, _ = built
    moequant.patch(model)
    moequant.unpatch(model)
    assert not hasattr(model, "make_cache")
    assert type(model.model.layers[0].self_attn).__name__ == "DeepseekV3Attention"


def test_kimi_k25_build(ckpt, tmp_path):
    """A converted tiny Kimi-K2.5 (mlx-lm's kimi_k25 model, rope dim 32: group 32)
    decodes with 8- and 4-bit caches as mlx-lm's attention does on the dequantized
    cache; group 64 is refused naming the rope dimension."""
    from mlx_lm import load

    from moequant.convert import convert

    convert(ckpt("kimi_k25"), tmp_path / "k", "int4-native", progress=False)
    model, _ = load(str(tmp_path / "k"))
    assert moequant.patch(model) >= 1 and type(model).__module__.endswith("kimi_k25")
    assert isinstance(make_prompt_cache(model)[0], MLAKVCache)
    # A bf16 model: the two paths round differently (ours accumulates in float32). One
    # layer, the same input (so the same cached codes), at bf16 tolerance (the reference
    # keeps the float32 dequantized latent through embed_q, ours rounds it to bf16):
    from mlx_lm.models.base import create_causal_mask

    attn = model.layers[1].self_attn
    rng = np.random.default_rng(0)
    for bits in (8, 4):
        ours, ref = MLAQuantizedKVCache(32, bits), DequantizedKVCache(bits, 32)
        x = mx.array(rng.standard_normal((1, 20, attn.hidden_size)).astype(np.float32)).astype(mx.bfloat16)
        mask = create_causal_mask(20)
        for step in range(3):
            a = np.array(attn(x, mask, cache=ours).astype(mx.float32))
            b = np.array(attn(x, mask, cache=ref).astype(mx.float32))
            assert np.abs(a - b).max() < 5e-2 * np.abs(b).max(), (bits, step)
            x, mask = x[:, -1:] * 0.5, None
    # The whole model, fed the same tokens: in the upper layers the two paths' keys
    # differ by rounding, which at 8 bits rarely moves a code; logits stay close (bf16
    # tolerance as above: the patched model also runs moequant's float32 MLA attention
    # and linear layers, which round differently from the reference cache's path).
    ours = [MLAQuantizedKVCache(32, 8) for _ in model.layers]
    ref = [DequantizedKVCache(8, 32) for _ in model.layers]
    tokens = PROMPT[None]
    for step in range(5):
        a = np.array(model(tokens, cache=ours)[:, -1].astype(mx.float32))
        b = np.array(model(tokens, cache=ref)[:, -1].astype(mx.float32))
        assert np.abs(a - b).max() < 5e-2 * np.abs(b).max(), step
        tokens = mx.array([[int(np.argmax(b))]])
    with pytest.raises(ValueError, match="qk_rope_head_dim 32"):
        greedy(model, 2, kv_bits=8, kv_group_size=64, quantized_kv_start=0)


# ---- deepseek_v32: MLA plus the indexer of DeepSeek sparse attention ------------------
V32_CONFIG = tiny_deepseek.TINY_V32_CONFIG  # index_topk 8: short prompts go sparse


@pytest.fixture(scope="module")
def built_v32():
    return tiny_deepseek.build(V32_CONFIG, seed=3)


def v32_cache(model, lat):
    return [mlx_cache.CacheList(lat(), KVCache()) for _ in model.layers]


def test_v32_mlx_lm_alone_ignores_kv_bits(built_v32):
    """Upstream (mlx-lm 0.32.2): deepseek_v32's CacheList has no to_quantized, so
    kv_bits is silently ignored: the cache stays 16-bit. With the patch it is quantized."""
    model, _ = tiny_deepseek.build(V32_CONFIG, seed=3)
    cache = make_prompt_cache(model)
    greedy(model, 3, prompt_cache=cache, kv_bits=8, quantized_kv_start=0)
    assert type(cache[0][0]) is KVCache
    moequant.patch(model)
    cache = make_prompt_cache(model)
    greedy(model, 3, prompt_cache=cache, kv_bits=8, quantized_kv_start=0)
    assert isinstance(cache[0], kv_cache.MLACacheList)
    assert isinstance(cache[0][0], MLAQuantizedKVCache) and type(cache[0][1]) is KVCache


@pytest.mark.parametrize("bits,gs", [(8, 64), (4, 64), (4, 32)])
@pytest.mark.parametrize("prefill", [5, 30])
def test_v32_attention_matches_mlx_lm_on_dequantized_cache(built_v32, bits, gs, prefill):
    """One deepseek_v32 attention layer, against mlx-lm's own on a cache holding the
    dequantized values (the indexer reads the same inputs, so it picks the same
    positions). A 5-token prefill is dense (T <= index_topk 8) and its decode steps cross
    into the sparse path (the quantized rows gathered); a 30-token prefill is sparse from
    the start (mlx-lm's sparse mask through the chunked prefill)."""
    from mlx_lm.models.base import create_causal_mask

    model, cfg = built_v32
    moequant.patch(model)
    attn = model.model.layers[1].self_attn
    ours = mlx_cache.CacheList(MLAQuantizedKVCache(group_size=gs, bits=bits), KVCache())
    ref = mlx_cache.CacheList(DequantizedKVCache(bits, gs), KVCache())
    rng = np.random.default_rng(bits + gs + prefill)
    x = mx.array(rng.standard_normal((1, prefill, cfg["hidden_size"])).astype(np.float32))
    mask = create_causal_mask(prefill)
    for step in range(6):
        a, b = np.array(attn(x, mask, cache=ours)), np.array(attn(x, mask, cache=ref))
        assert np.abs(a - b).max() < 2e-5 * np.abs(b).max(), step
        x = mx.array(rng.standard_normal((1, 1, cfg["hidden_size"])).astype(np.float32))
        mask = None
    assert ours[0].offset == prefill + 5 and ours[1].offset == prefill + 5


@pytest.mark.parametrize("bits", [8, 4])
def test_v32_greedy_decode(built_v32, bits):
    """mlx-lm's generate with kv_bits on the patched deepseek_v32: no crash; 8 bits
    decodes the 16-bit cache's tokens; quantized from the first token on, the tokens of
    mlx-lm's attention on the dequantized cache."""
    model, _ = tiny_deepseek.build(V32_CONFIG, seed=3)
    want = greedy(model)
    moequant.patch(model)
    assert greedy(model, prompt_cache=make_prompt_cache(model)) == want
    cache = make_prompt_cache(model)
    got = greedy(model, prompt_cache=cache, kv_bits=bits, quantized_kv_start=0)
    assert all(isinstance(c[0], MLAQuantizedKVCache) and c[0].bits == bits for c in cache)
    assert len(got) == 12 and got[0] == want[0]
    if bits == 8:
        assert got == want
    ours = greedy(model, prompt_cache=v32_cache(model, lambda: MLAQuantizedKVCache(64, bits)))
    assert ours == greedy(model, prompt_cache=v32_cache(model, lambda: DequantizedKVCache(bits, 64)))


def test_v32_trim_and_save_load(built_v32, tmp_path):
    """Trim (both caches) then the same tokens again gives the same logits; a prompt
    cache saved and reloaded by mlx-lm continues as the original."""
    model, _ = built_v32
    moequant.patch(model)
    cache = make_prompt_cache(model)
    for c in cache:
        c.to_quantized(group_size=64, bits=4)
    model(PROMPT[None], cache=cache)
    extra = mx.array([[11, 12, 13]])
    want = np.array(model(extra, cache=cache))
    assert mlx_cache.can_trim_prompt_cache(cache)
    assert mlx_cache.trim_prompt_cache(cache, 3) == 3
    assert cache[0].offset == 30 and cache[0][1].offset == 30
    assert np.array_equal(np.array(model(extra, cache=cache)), want)

    f = tmp_path / "v32.safetensors"
    save_prompt_cache(str(f), cache)
    loaded = load_prompt_cache(str(f))
    assert [type(c) for c in loaded] == [kv_cache.MLACacheList] * len(cache)
    assert all(
        isinstance(c[0], MLAQuantizedKVCache) and (c[0].bits, c[0].offset) == (4, 33) and c[1].offset == 33
        for c in loaded
    )
    tok = mx.array([7])
    assert greedy(model, 6, prompt=tok, prompt_cache=loaded) == greedy(
        model, 6, prompt=tok, prompt_cache=cache
    )


def test_v32_plan_counts_the_indexer_cache():
    """`moequant plan` on a deepseek_v32 config: the latent columns as for DeepSeek-V3,
    plus the indexer's 16-bit key cache (keys and mlx-lm's same-size zero values), which
    --kv-bits leaves unquantized."""
    from moequant.plan import format_kv_table, kv_cache_table

    cfg = dict(
        model_type="deepseek_v32",
        num_hidden_layers=61,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        index_head_dim=128,
        max_position_embeddings=163840,
    )
    kv = kv_cache_table(cfg)
    assert kv["bytes_per_token_layer"]["8-bit g64"] == 612
    assert kv["indexer_bytes_per_token_layer"] == 2 * 128 * 2
    text = format_kv_table(kv)
    assert "indexer's cache" in text and "128K 4.1 GB" in text
    assert "indexer" not in format_kv_table(kv_cache_table(dict(cfg, index_head_dim=None)))


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v32"])
def test_decode_without_metal_kernels_uses_mlx_ops(arch, monkeypatch):
    """A GPU default device in a build without moequant's Metal kernels: decode steps
    take the chunked MLX-ops path (same tokens), not a RuntimeError from the kernel. The
    device check is faked on the CPU (this machine has no GPU)."""
    from moequant import ops

    cfg = V32_CONFIG if arch == "deepseek_v32" else KV_CONFIG
    model, _ = tiny_deepseek.build(cfg, seed=3)
    moequant.patch(model)
    want = greedy(model, 6, prompt_cache=make_prompt_cache(model), kv_bits=8, quantized_kv_start=0)
    calls = []
    monkeypatch.setattr(ops, "has_metal", False)
    monkeypatch.setattr(kv_cache, "mla_decode_attention", lambda *a, **k: calls.append(1))
    real = mx.default_device
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    try:
        got = greedy(model, 6, prompt_cache=make_prompt_cache(model), kv_bits=8, quantized_kv_start=0)
    finally:
        monkeypatch.setattr(mx, "default_device", real)
    assert got == want and not calls
