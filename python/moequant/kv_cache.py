"""A quantized (8/4-bit) MLA latent KV cache for the DeepSeek-V3 family, and the
attention that reads it.

MLA caches one compressed latent per token and layer: ``kv_latent`` (``kv_lora_rank``
values, 512 on Kimi) and the roped key part ``k_pe`` (``qk_rope_head_dim``, 64). mlx-lm
keeps them in a ``KVCache`` as keys and values; its ``--kv-bits`` turns that into a
``QuantizedKVCache`` whose tuples the DeepSeek-V3 attention cannot use (mlx-lm 0.32.2
crashes on the first token: ``'list' object has no attribute 'swapaxes'``).

* ``MLAKVCache``: mlx-lm's ``KVCache`` (fp16/bf16, the model's dtype) whose
  ``to_quantized`` gives an ``MLAQuantizedKVCache``: what mlx-lm's ``kv_bits`` /
  ``quantized_kv_start`` switch calls after ``quantized_kv_start`` tokens.
* ``MLAQuantizedKVCache``: latent and k_pe as ``mx.quantize`` affine codes (4 or 8 bits,
  group 32/64/128 dividing both dimensions), with mlx-lm's cache semantics (``offset``,
  ``state``/``meta_state``, ``trim``, ``is_trimmable``, ``nbytes``, ``make_mask``,
  ``save_prompt_cache``/``load_prompt_cache``). It subclasses mlx-lm's
  ``QuantizedKVCache``, so mlx-lm's own checks of ``--kv-bits`` against a loaded prompt
  cache apply. ``load_prompt_cache`` finds cache classes by name in
  ``mlx_lm.models.cache``: importing this module registers both classes there.
* ``patch_kv_cache(model)``: the model's ``make_cache`` returns ``MLAKVCache`` per
  layer, and each MLA attention layer, when its cache is an ``MLAQuantizedKVCache``,
  runs ``mla_attention`` (decode: the fused ``ops.mla_decode_attention`` kernel;
  several tokens: the cache dequantized chunk by chunk); with any other cache the
  layer's own ``__call__`` runs. ``moequant.patch`` calls it.
* deepseek_v32 (MLA plus the indexer of DeepSeek sparse attention): its per-layer
  ``CacheList(latent, indexer keys)`` becomes an ``MLACacheList`` whose ``to_quantized``
  quantizes the latent cache only (the indexer scores all cached keys in the model's
  dtype), and ``mla_attention_v32`` reads the quantized latent at the positions the
  indexer picks (mlx-lm's own CacheList has no ``to_quantized``: its ``--kv-bits``
  silently keeps the 16-bit cache there).

Memory per token and layer: ``(R + DR) * bits / 8`` bytes of codes plus
``2 * (R + DR) / group_size`` scales and biases in the model's dtype
(``bytes_per_token``); Kimi-K2.5 at 8 bits, g64: 612 B vs 1152 B in bf16.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import mlx.core as mx
from mlx_lm.models import cache as _mlx_cache
from mlx_lm.models.cache import CacheList, KVCache, QuantizedKVCache

from . import ops
from .mla_attention import project
from .mlx_lm_patch import import_classes
from .ops import mla_decode_attention
from .quant_formats import GROUP_SIZES, KV_CACHE_BITS

SUPPORTED_BITS = KV_CACHE_BITS
SUPPORTED_GROUPS = GROUP_SIZES

# Cached positions dequantized at a time by the prefill path (several query tokens):
# bounds its temporary memory to about this many positions whatever the context.
PREFILL_CHUNK = 4096

# MLA attention classes whose __call__ mla_attention reproduces (module, class).
_ATTENTION = (("mlx_lm.models.deepseek_v3", "DeepseekV3Attention"),)
# deepseek_v32: the same MLA plus an indexer (DeepSeek sparse attention) with its own
# key cache; mla_attention_v32 reproduces its __call__.
_ATTENTION_V32 = (("mlx_lm.models.deepseek_v32", "DeepseekV32Attention"),)


def check_kv_quantization(bits, group_size, latent_dim=None, rope_dim=None) -> None:
    """ValueError naming the bad argument or dimension."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"kv_bits must be 4 or 8 for the MLA latent cache; got {bits!r}")
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"kv_group_size must be 32, 64 or 128; got {group_size!r}")
    bad = [
        f"{n} {d}"
        for n, d in (("kv_lora_rank", latent_dim), ("qk_rope_head_dim", rope_dim))
        if d is not None and d % group_size
    ]
    if bad:
        raise ValueError(
            f"kv_group_size {group_size} does not divide the MLA cache's {' and '.join(bad)} "
            f"(kv_lora_rank {latent_dim}, qk_rope_head_dim {rope_dim}); choose a group size "
            "that divides both"
        )


def bytes_per_token(
    latent_dim: int, rope_dim: int, bits: Optional[int] = None, group_size: int = 64, dtype_bytes: int = 2
) -> int:
    """Cache bytes per token and layer: fp16/bf16 (bits None) or quantized."""
    n = latent_dim + rope_dim
    if bits is None:
        return n * dtype_bytes
    return n * bits // 8 + 2 * (n // group_size) * dtype_bytes


class MLAKVCache(KVCache):
    """mlx-lm's KVCache for an MLA layer (keys: kv_latent, values: k_pe) that quantizes
    into an MLAQuantizedKVCache."""

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "MLAQuantizedKVCache":
        q = MLAQuantizedKVCache(group_size=group_size, bits=bits)
        q.offset = self.offset
        if self.keys is not None:
            check_kv_quantization(bits, group_size, self.keys.shape[-1], self.values.shape[-1])
            n = self.offset
            q.keys = mx.quantize(self.keys[..., :n, :], group_size=group_size, bits=bits)
            q.values = mx.quantize(self.values[..., :n, :], group_size=group_size, bits=bits)
        return q


class MLAQuantizedKVCache(QuantizedKVCache):
    """The MLA latent cache at 4/8 bits: ``keys`` = kv_latent and ``values`` = k_pe as
    (codes, scales, biases) of shape ``(B, 1, T, ...)``, grown in steps of 256 tokens
    (mlx-lm's QuantizedKVCache storage). ``state`` holds the first ``offset`` tokens."""

    def __init__(self, group_size: int = 64, bits: int = 8):
        check_kv_quantization(bits, group_size)
        super().__init__(group_size=group_size, bits=bits)

    def update_and_fetch(self, keys, values):
        check_kv_quantization(self.bits, self.group_size, keys.shape[-1], values.shape[-1])
        return super().update_and_fetch(keys, values)

    def fetch(self) -> Tuple[tuple, tuple]:
        """(latent, k_pe) quantized triples of the first ``offset`` tokens."""
        return tuple(tuple(a[..., : self.offset, :] for a in t) for t in (self.keys, self.values))

    @property
    def state(self):
        if self.keys is None:
            return None, None, self.offset, self.group_size, self.bits
        lat, pe = self.fetch()
        return lat, pe, self.offset, self.group_size, self.bits

    @state.setter
    def state(self, v):
        keys, values, offset, group_size, bits = v
        check_kv_quantization(int(bits), int(group_size))
        self.keys = tuple(keys) if keys is not None else None
        self.values = tuple(values) if values is not None else None
        self.offset, self.group_size, self.bits = int(offset), int(group_size), int(bits)

    @property
    def meta_state(self):
        return tuple(map(str, (self.offset, self.group_size, self.bits)))

    @meta_state.setter
    def meta_state(self, v):
        self.offset, self.group_size, self.bits = map(int, v)

    def size(self):
        return self.offset


class MLACacheList(CacheList):
    """deepseek_v32's per-layer CacheList(latent cache, indexer cache) with what mlx-lm's
    ``kv_bits`` switch needs: ``offset`` and ``to_quantized``, which quantizes the latent
    cache only (the indexer scores every cached key in the model's dtype; mlx-lm's own
    CacheList has neither, so ``--kv-bits`` silently did nothing on deepseek_v32)."""

    @property
    def offset(self):
        return self.caches[0].offset

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "MLACacheList":
        lat = self.caches[0]
        if isinstance(lat, MLAKVCache):
            self.caches = (lat.to_quantized(group_size=group_size, bits=bits), *self.caches[1:])
        return self


# mlx-lm's load_prompt_cache looks cache classes up by name in its own module.
for _cls in (MLAKVCache, MLAQuantizedKVCache, MLACacheList):
    setattr(_mlx_cache, _cls.__name__, _cls)


# --------------------------------------------------------------------------- attention


def _dequantize(t, c0, c1, group_size, bits):
    w, s, b = (a[..., c0:c1, :] for a in t)
    return mx.dequantize(w, s, b, group_size=group_size, bits=bits).astype(mx.float32)


def _prefill(attn, q_nope, q_pe, cache, mask):
    """Several query tokens against the quantized cache (which already holds them),
    cached positions dequantized PREFILL_CHUNK at a time, softmax merged online in
    float32. Returns (B, H, L, v_head_dim) in q's dtype."""
    lat, pe = cache.keys, cache.values
    T, gs, bits = cache.offset, cache.group_size, cache.bits
    B, H, L, _ = q_nope.shape
    if isinstance(mask, str):  # "causal": the queries are the last L positions
        mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
    qn, qp = q_nope.astype(mx.float32), q_pe.astype(mx.float32)
    m = mx.full((B, H, L, 1), -math.inf, mx.float32)
    den = mx.zeros((B, H, L, 1), mx.float32)
    acc = None
    for c0 in range(0, T, PREFILL_CHUNK):
        c1 = min(T, c0 + PREFILL_CHUNK)
        kl = _dequantize(lat, c0, c1, gs, bits)  # (B, 1, C, R)
        kp = _dequantize(pe, c0, c1, gs, bits)
        k = attn.embed_q(kl.astype(q_nope.dtype), transpose=False).astype(mx.float32)
        v = attn.unembed_out(kl.astype(q_nope.dtype)).astype(mx.float32)
        s = attn.scale * (qn @ k.swapaxes(-1, -2) + qp @ kp.swapaxes(-1, -2))
        if mask is not None:
            mc = mask[..., c0:c1]
            s = mx.where(mc, s, -math.inf) if mc.dtype == mx.bool_ else s + mc
        m_new = mx.maximum(m, s.max(axis=-1, keepdims=True))
        # Rows with every position so far masked keep m = -inf: no NaN from inf - inf.
        safe = mx.where(m_new == -math.inf, 0.0, m_new)
        p = mx.exp(s - safe)
        alpha = mx.exp(m - safe)
        den = den * alpha + p.sum(axis=-1, keepdims=True)
        acc = p @ v if acc is None else acc * alpha + p @ v
        m = m_new
    return (acc / den).astype(q_nope.dtype)


def _decode(attn, q_nope, q_pe, lat, pe, cache):
    """One query token against the quantized triples lat/pe with the fused kernel, then
    ``unembed_out``: (B, H, 1, v_head_dim). On a GPU without moequant's Metal kernels
    (a build whose metallib failed), the chunked MLX-ops path instead."""
    if mx.default_device() != mx.cpu and not ops.has_metal:
        view = SimpleNamespace(
            keys=lat, values=pe, offset=lat[0].shape[-2], group_size=cache.group_size, bits=cache.bits
        )
        return _prefill(attn, q_nope, q_pe, view, None)
    q_lat = attn.embed_q(q_nope)  # (B, H, 1, R)
    out = mla_decode_attention(
        q_lat[:, :, 0], q_pe[:, :, 0], lat, pe, scale=attn.scale, bits=cache.bits, group_size=cache.group_size
    )
    return attn.unembed_out(out[:, :, None])


def mla_attention(attn, x, mask, cache: MLAQuantizedKVCache):
    """DeepseekV3Attention.__call__ with an MLAQuantizedKVCache. Decode (one token): the
    query in latent space against the quantized cache with ``mla_decode_attention``,
    then ``unembed_out``; more tokens: ``_prefill``."""
    B, L, _ = x.shape
    q_nope, q_pe, latent, k_pe = project(attn, x, cache.offset)
    cache.update_and_fetch(latent, k_pe)
    # The fused decode kernel attends to every cached position; an explicit mask (e.g. a
    # batch's left padding) takes the masked path instead of being dropped.
    if L == 1 and (mask is None or isinstance(mask, str)):
        out = _decode(attn, q_nope, q_pe, *cache.fetch(), cache)
    else:
        out = _prefill(attn, q_nope, q_pe, cache, mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def mla_attention_v32(attn, x, mask, caches: CacheList):
    """DeepseekV32Attention.__call__ with CacheList(MLAQuantizedKVCache, indexer cache).
    The indexer (its own keys, in the model's dtype) picks ``index_topk`` cached
    positions per query once the cache holds more; the attention is MLA's over those
    positions. Decode: the quantized rows at the picked positions are gathered (codes,
    scales and biases: exact) and read by the fused kernel; more tokens: ``_prefill``
    with mlx-lm's sparse mask (the picked positions, and the causal mask)."""
    B, L, _ = x.shape
    cache, index_cache = caches[0], caches[1]
    q_nope, q_pe, latent, k_pe, qr = project(attn, x, cache.offset, with_qr=True)
    cache.update_and_fetch(latent, k_pe)
    topk = attn.indexer(x, qr, mask, cache=index_cache)
    if topk is not None:
        topk = mx.stop_gradient(topk)  # (B, 1, L, index_topk)
    if L == 1 and mask is None:
        lat, pe = cache.fetch()
        if topk is not None:
            idx = topk[:, :, 0, :, None]  # (B, 1, k, 1)

            def pick(t):
                return tuple(
                    mx.take_along_axis(a, mx.broadcast_to(idx, idx.shape[:-1] + (a.shape[-1],)), axis=2)
                    for a in t
                )

            lat, pe = pick(lat), pick(pe)
        out = _decode(attn, q_nope, q_pe, lat, pe, cache)
    else:
        if topk is not None:
            shape = list(topk.shape)
            shape[-1] = cache.offset
            sparse = mx.put_along_axis(mx.zeros(shape, dtype=mx.bool_), topk, mx.array(True), axis=-1)
            if isinstance(mask, str):
                mask = mx.arange(cache.offset - L, cache.offset)[:, None] >= mx.arange(cache.offset)[None]
            mask = sparse if mask is None else sparse & mask
        out = _prefill(attn, q_nope, q_pe, cache, mask)
    # The indexer's cache is evaluated with this step even when its top-k is unused (as
    # mlx-lm ties it to the latent cache), so its graph does not grow step after step.
    out = mx.depends(out, [index_cache.keys, index_cache.values])
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


# --------------------------------------------------------------------------- the hook

_kv_classes: Dict[type, type] = {}


class _QuantizedCacheAttention:
    """Mixed in before an MLA attention class: a quantized latent cache goes to
    mla_attention, anything else to the class's own __call__."""

    def __call__(self, x, mask=None, cache=None):
        if isinstance(cache, MLAQuantizedKVCache):
            return mla_attention(self, x, mask, cache)
        if isinstance(cache, CacheList) and isinstance(cache[0], MLAQuantizedKVCache):
            return mla_attention_v32(self, x, mask, cache)
        return super().__call__(x, mask, cache)


def _make_cache(model):
    return [MLAKVCache() for _ in model.layers]


def _make_cache_v32(model):
    return [MLACacheList(MLAKVCache(), KVCache()) for _ in model.layers]


def patch_kv_cache(model) -> int:
    """Make ``model`` use the MLA latent cache classes (see the module docstring), in
    place; returns how many attention layers read a quantized cache. Composes with any
    other class swap of the attention layers applied before it (the mixin wraps the
    current class; ``_moequant_base`` keeps naming the original, for ``unpatch``).
    Idempotent."""
    v32 = import_classes(_ATTENTION_V32)
    bases = import_classes(_ATTENTION) + v32
    n = 0
    has_v32 = False
    for _, m in model.named_modules():
        cur = type(m)
        base = getattr(cur, "_moequant_base", cur)
        if issubclass(cur, _QuantizedCacheAttention):
            n += 1
            has_v32 |= base in v32
            continue
        if base not in bases:
            continue
        has_v32 |= base in v32
        if cur not in _kv_classes:
            _kv_classes[cur] = type(
                f"KV{cur.__name__}", (_QuantizedCacheAttention, cur), {"_moequant_base": base}
            )
        m.__class__ = _kv_classes[cur]
        n += 1
    # The model's caches: MLAKVCache instead of mlx-lm's default KVCache; deepseek_v32's
    # CacheList(latent, indexer) becomes an MLACacheList (other models with a make_cache
    # of their own keep theirs).
    if n and has_v32:
        object.__setattr__(model, "make_cache", lambda: _make_cache_v32(model))
    elif n and not hasattr(type(model), "make_cache"):
        object.__setattr__(model, "make_cache", lambda: _make_cache(model))
    return n


def unpatch_kv_cache(model) -> None:
    """Remove the make_cache set by patch_kv_cache (``moequant.unpatch`` restores the
    attention classes)."""
    if "make_cache" in getattr(model, "__dict__", {}):
        object.__delattr__(model, "make_cache")


def mla_dims(config: dict):
    """(kv_lora_rank, qk_rope_head_dim) of an MLA model config (Kimi-K2.5 nests them in
    text_config), or None for a model without MLA."""
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and isinstance(c.get("kv_lora_rank"), int):
            return c["kv_lora_rank"], c.get("qk_rope_head_dim", 0)
    return None


def check_kv_args(args, config: Optional[dict] = None) -> None:
    """The CLIs' --kv-bits / --kv-group-size / --quantized-kv-start against the MLA model
    (config.json): a UserError (exit 2) naming the flag, before anything is loaded."""
    from .errors import UserError

    bits = getattr(args, "kv_bits", None)
    if bits is None:
        return
    gs = getattr(args, "kv_group_size", 64)
    start = getattr(args, "quantized_kv_start", 0)
    if isinstance(start, int) and start < 0:
        raise UserError(f"--quantized-kv-start must be >= 0; got {start}")
    dims = mla_dims(config or {})
    try:
        check_kv_quantization(bits, gs, *(dims or (None, None)))
    except ValueError as e:
        msg = str(e).replace("kv_bits", "--kv-bits").replace("kv_group_size", "--kv-group-size")
        raise UserError(msg) from None


def logits_with_cache(
    model, tokens, bits: int, group_size: int = 64, quantized_kv_start: int = 0, prefill_step_size: int = 512
) -> mx.array:
    """``model(tokens)`` (tokens ``(1, L)``) computed as mlx-lm's generate prefills: in
    steps of ``prefill_step_size`` tokens through the model's cache, which becomes a
    ``bits``-bit MLAQuantizedKVCache once it holds ``quantized_kv_start`` tokens (mlx-lm's
    maybe_quantize_kv_cache between steps), so later steps attend to the quantized
    cache. Used by ``moequant eval --kv-bits`` to measure what the cache costs."""
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    patch_kv_cache(model)
    cache = make_prompt_cache(model)
    out = []
    for c0 in range(0, tokens.shape[1], prefill_step_size):
        out.append(model(tokens[:, c0 : c0 + prefill_step_size], cache=cache))
        maybe_quantize_kv_cache(cache, quantized_kv_start, group_size, bits)
        mx.eval(out[-1], [c.state for c in cache])
    return mx.concatenate(out, axis=1)
