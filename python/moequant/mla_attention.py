"""mlx-lm's MLA attention (DeepSeek-V3, Kimi-K2.x) on the CPU in float32.

mlx-lm's ``DeepseekV3Attention`` runs its per-head up-projections (``embed_q`` and
``unembed_out``, ``QuantizedMultiLinear``) on MLX's CPU ``quantized_matmul``, which is
slow on batched weights and very slow with bf16 activations (a 512-token forward of the
demo model spent 0.95 s per layer there, bench/RESULTS.md), and then the CPU SDPA on
whatever dtype the model runs. ``patch_attention(model)`` swaps the class of every such
layer for a subclass whose ``__call__``, on the CPU stream:

* keeps mlx-lm's projections, norms, rope and cache update unchanged (the q/kv/o
  projections are ``nn.QuantizedLinear``: ``moequant.patch`` routes them separately);
* holds the two per-head up-projections as dense float32 weights, dequantized once per
  layer (``mx.dequantize``, MLX's own definition) and kept next to the layer, not in its
  parameter tree. Memory: ``4 * H * kv_lora_rank * (qk_nope_head_dim + v_head_dim)`` bytes
  per layer, 33.5 MB for a Kimi-K2 layer (2.0 GB for its 61 layers, against ~6 MB per layer
  at 6 bits). Reading them is one batched float32 matmul per projection; per-head
  ``quantized_linear`` calls, which would read the quantized bytes, cost more in per-call
  overhead than they save at these sizes (bench/RESULTS.md, issue 15 MLA section). Decode
  steps (up to QUANTIZED_ROWS query rows) read the quantized weights instead, all heads in
  one ``quantized_multi_linear`` call (a Kimi layer: 6.8 MB at 6 bits against 33.5 MB);
  a decode step on a float cache runs its whole absorbed core (embed_q, scores, softmax,
  latent values, unembed_out) as one ``mla_decode_core`` primitive, the same kernels in
  the same order (bit-identical; ~15 graph nodes per layer fewer);
* computes the attention in float32, in whichever form needs fewer multiply-adds for the
  call's L queries over S cached positions: *expanded* (keys and values decompressed per
  head from the latent, as mlx-lm does for L > 1: prefill, eval) or *absorbed* (the query
  moved into the latent space, as mlx-lm does for L = 1: decode); queries in chunks that
  keep a chunk's float32 scores near ``SCORE_CHUNK_BYTES``;
* returns the attention output in the activations' dtype, as mlx-lm does.

Anything else (another device, mlx-lm's quantized KV cache, a layer whose up-projections
are neither ``MultiLinear`` nor affine ``QuantizedMultiLinear``) runs mlx-lm's own call.

The cache seam: a KV cache object with an ``attend`` method takes over the cache update
and the attention itself, in latent space::

    out_latent = cache.attend(q_latent, q_pe, kv_latent, k_pe, scale=scale, mask=mask)

with ``q_latent`` (B, H, L, kv_lora_rank) float32 (the roped-free query part already
absorbed through ``embed_q``), ``q_pe`` (B, H, L, rope) float32 and roped, ``kv_latent``
(B, 1, L, kv_lora_rank) and ``k_pe`` (B, 1, L, rope) the call's new entries in the model's
dtype (normed and roped; the cache appends them), ``mask`` as mlx-lm passes it (None, a
boolean or additive (L, S) array, or "causal"). It returns the softmax-weighted sum of the
cached latents (B, H, L, kv_lora_rank); this module applies ``unembed_out`` and ``o_proj``.
"""

from __future__ import annotations

from typing import Dict

import mlx.core as mx

from . import quant_formats
from .mlx_lm_patch import (
    _MLA_PAIR,
    DEFAULT_MAX_TOKENS,
    _FusedRoPE,
    _FusedYarnRoPE,
    import_classes,
    pair_linear,
)
from .ops import matmul_nt, mla_decode_core, quantized_multi_linear, softmax_rows

# (module, class) of the attention layers whose __call__ this reproduces.
_ATTENTION = (("mlx_lm.models.deepseek_v3", "DeepseekV3Attention"),)

# Float32 scores of one query chunk (B * H * chunk * S * 4 bytes) stay near this.
SCORE_CHUNK_BYTES = 64 << 20
# Queries per chunk at most with a causal mask: each chunk skips the positions after
# its last query, so smaller chunks skip more (per-chunk op overhead is ~0.1 ms).
CAUSAL_CHUNK = 256

# Query rows (B * L) up to which the absorbed form's up-projections read the quantized
# weights (decode steps); longer calls use the float32 copies (a GEMM's operand).
QUANTIZED_ROWS = DEFAULT_MAX_TOKENS

_mla_classes: Dict[type, type] = {}


def _dense(m):
    """The float32 (H, out, in) weight of a MultiLinear or affine QuantizedMultiLinear,
    or None for another layout."""
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

    if isinstance(m, QuantizedMultiLinear):
        if getattr(m, "mode", "affine") != "affine" or m.get("biases") is None:
            return None
        # float32 scales and biases: scale * q + bias exactly, not rounded to bf16.
        f32 = mx.float32
        w = mx.dequantize(
            m["weight"],
            m["scales"].astype(f32),
            m["biases"].astype(f32),
            group_size=m.group_size,
            bits=m.bits,
        )
    elif isinstance(m, MultiLinear):
        w = m["weight"]
    else:
        return None
    return w.astype(mx.float32) if w.ndim == 3 else None


def _dense_weights(attn):
    """(Wk (H, R, dn), Wv (H, dv, R)) float32 for the layer, made once; remade if a
    projection's weight array was replaced (load_weights, update, sharding after patch)."""
    return _layer_state(attn)[0]


def _layer_state(attn):
    """(dense weights or None, the quantized up-projection functions or None: see
    _up_projections) of the layer, made once per pair of projection weight arrays (a
    decode step then builds none of it again)."""
    srcs = (attn.embed_q.get("weight"), attn.unembed_out.get("weight"))
    cached = attn.__dict__.get("_moequant_dense")
    if cached is not None and all(a is b for a, b in zip(cached[0], srcs)):
        return cached[1]
    wk, wv = _dense(attn.embed_q), _dense(attn.unembed_out)
    dense = None
    if wk is not None and wv is not None:
        mx.eval(wk, wv)
        dense = (wk, wv)
    state = (dense, _quantized_up_projections(attn))
    object.__setattr__(attn, "_moequant_dense", (srcs, state))
    return state


def _mask_rows(mask, i0, i1, L, S, n=None):
    """mlx-lm's mask for query rows i0:i1 over the first n (default S) positions: a
    boolean (rows, n) array, an additive array, or None."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"MLA attention: unsupported mask {mask!r}")
        # The L queries are the last L of the S positions.
        return mx.arange(S - L + i0, S - L + i1)[:, None] >= mx.arange(S if n is None else n)[None]
    m = mask[..., i0:i1, :]
    if m.dtype == mx.bool_ and m.ndim > 2 and all(d == 1 for d in m.shape[:-2]):
        m = m.reshape(m.shape[-2:])
    return m


def _softmax_rows(s, scale, mask):
    """softmax(scale * s) over the allowed positions, float32."""
    if mask is None or (mask.dtype == mx.bool_ and mask.ndim == 2):
        return softmax_rows(s, mask, scale=scale)
    # Other masks (per-batch or additive): MLX's ops.
    s = s * scale
    if mask.dtype == mx.bool_:
        s = mx.where(mask, s, mx.array(mx.finfo(mx.float32).min, mx.float32))
    else:
        s = s + mask.astype(mx.float32)
    return mx.softmax(s, axis=-1, precise=True)


def _expanded_cost(L, S, R, dn, dr, dv):
    return S * R * (dn + dv) + L * S * (dn + dr + dv)


def _absorbed_cost(L, S, R, dn, dr, dv):
    return L * R * (dn + dv) + L * S * (2 * R + dr)


def _nt(a, b):
    """a @ b^T over the last two axes, leading axes broadcast, float32, on
    ``matmul_nt`` (MLX's CPU matmul is the reference BLAS: see csrc/dense_gemm)."""
    lead = mx.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return matmul_nt(mx.broadcast_to(a, lead + a.shape[-2:]), mx.broadcast_to(b, lead + b.shape[-2:]))


def attend(q_nope, q_pe, kv_latent, k_pe, wk, wv, scale, mask, quantized=None):
    """Float32 MLA attention: q_nope (B, H, L, dn), q_pe (B, H, L, dr) roped, kv_latent
    (B, 1, S, R), k_pe (B, 1, S, dr) roped, wk (H, R, dn), wv (H, dv, R) -> (B, H, L, dv)
    float32, scores ``scale * (q_nope . k + q_pe . k_pe)`` with k = latent @ wk and
    v = latent @ wv^T per head. Picks the expanded or the absorbed form by
    multiply-adds; chunks the queries. ``quantized``: the layer's (embed_q, unembed_out)
    as (B, H, L, K) float32 -> (B, H, L, N) float32 functions (``_up_projections``), used
    for the absorbed form's two products in place of wk and wv."""
    B, H, L, dn = q_nope.shape
    S, R, dr, dv = kv_latent.shape[-2], kv_latent.shape[-1], q_pe.shape[-1], wv.shape[-2]
    f32 = mx.float32
    q_nope, q_pe = q_nope.astype(f32), q_pe.astype(f32)
    lat, kp = kv_latent.astype(f32), k_pe.astype(f32)  # (B, 1, S, R), (B, 1, S, dr)
    absorbed = _absorbed_cost(L, S, R, dn, dr, dv) <= _expanded_cost(L, S, R, dn, dr, dv)
    if absorbed:
        # The query in latent space: one shared key/value head (the latent itself). The
        # weights are the streamed side of the products (no packed copy of them).
        q = quantized[0](q_nope) if quantized else _nt(wk, q_nope).swapaxes(-1, -2)  # (B, H, L, R)
        q = mx.concatenate([q, q_pe], axis=-1)
        k = mx.concatenate([lat, kp], axis=-1)  # (B, 1, S, R + dr)
        vt = lat.swapaxes(-1, -2)  # (B, 1, R, S)
        if L == 1 and mask is None:
            # A decode step: the H heads are the rows of both products as they come, (B,
            # 1, H, .); the same row products and softmax rows as the chunked loop's,
            # without its reshapes.
            s = matmul_nt(q.reshape(B, 1, H, R + dr), k)
            out = matmul_nt(softmax_rows(s, None, scale=scale), vt).reshape(B, H, 1, R)
            return quantized[1](out) if quantized else _nt(wv, out).swapaxes(-1, -2)
    else:
        # Keys and values per head, for all heads in one product each.
        lat = lat.reshape(B, S, R)
        kp = kp.reshape(B, S, dr)
        wkt = wk.swapaxes(-1, -2).reshape(H * dn, R)
        k = _nt(lat, wkt).reshape(B, S, H, dn).transpose(0, 2, 1, 3)
        k = mx.concatenate([k, mx.broadcast_to(kp[:, None], (B, H, S, dr))], axis=-1)
        vt = _nt(wv.reshape(H * dv, R), lat).reshape(B, H, dv, S)
        q = mx.concatenate([q_nope, q_pe], axis=-1)
    chunk = max(1, min(L, SCORE_CHUNK_BYTES // max(1, 4 * B * H * S)))
    # A causal query chunk sees only the positions up to its last query: its scores,
    # softmax and value product stop there (about half the work of a long prompt with
    # chunks of CAUSAL_CHUNK queries).
    causal = isinstance(mask, str) and mask == "causal" and L > 1
    if causal:
        chunk = min(chunk, CAUSAL_CHUNK)
    outs = []
    for i0 in range(0, L, chunk):
        i1 = min(L, i0 + chunk)
        qc = q if chunk == L else q[..., i0:i1, :]
        n = S - L + i1 if causal else S  # positions this chunk attends to
        kc = k if n == S else k[..., :n, :]
        vc = vt if n == S else vt[..., :n]
        if absorbed:
            # Every head against the one latent head: heads x queries as the rows.
            s = _nt(qc.reshape(B, 1, H * (i1 - i0), -1), kc).reshape(B, H, i1 - i0, n)
        else:
            s = _nt(qc, kc)
        p = _softmax_rows(s, scale, _mask_rows(mask, i0, i1, L, S, n))
        if absorbed:
            outs.append(_nt(p.reshape(B, 1, H * (i1 - i0), n), vc).reshape(B, H, i1 - i0, R))
        else:
            outs.append(_nt(p, vc))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-2)
    if not absorbed:
        return out
    return quantized[1](out) if quantized else _nt(wv, out).swapaxes(-1, -2)


def _up_projections(attn, rows):
    """The absorbed form's per-head products on the quantized weights themselves
    (``quantized_multi_linear``: each 6-bit byte read once, not the float32 copy's 4
    bytes per weight) for a call of ``rows`` query rows up to QUANTIZED_ROWS (decode
    steps); None otherwise (other layouts, longer calls)."""
    return _layer_state(attn)[1] if rows <= QUANTIZED_ROWS else None


class _UpProjections(list):
    """(embed_q, unembed_out) as (B, H, L, K) float32 -> (B, H, L, N) float32 functions on
    ``quantized_multi_linear``; ``core`` holds the same weights as ``mla_decode_core``'s
    arguments (embed_q's and unembed_out's (weight, scales, biases), bits, group_size)."""

    core: dict


def _quantized_up_projections(attn):
    """The layer's _UpProjections, or None for layers of another layout."""
    from mlx_lm.models.mla import QuantizedMultiLinear

    fns = _UpProjections()
    mods = (attn.embed_q, attn.unembed_out)
    for m in mods:
        if (
            not isinstance(m, QuantizedMultiLinear)
            or getattr(m, "mode", "affine") != "affine"
            or m.get("biases") is None
            or not quant_formats.supported(m.bits, m.group_size)
        ):
            return None
        fns.append(
            lambda x, m=m: quantized_multi_linear(
                x.astype(mx.float32),
                m["weight"],
                m["scales"],
                m["biases"],
                bits=m.bits,
                group_size=m.group_size,
            )
        )
    triples = [(m["weight"], m["scales"], m["biases"]) for m in mods]
    fns.core = dict(
        embed_q=triples[0],
        unembed_out=triples[1],
        bits=tuple(m.bits for m in mods),
        group_size=tuple(m.group_size for m in mods),
    )
    return fns


def _decode_core(q_nope, q_pe, kv_latent, k_pe, scale, dv, quantized, dtype):
    """``mla_decode_core`` (one primitive for ~15 nodes) when ``attend`` would run its
    one-query absorbed form on the quantized up-projections (the same kernels in the same
    order: bit-identical once cast to ``dtype``, the layer's output dtype), else None.
    q_nope (B, H, 1, dn), q_pe (B, H, 1, dr) roped, kv_latent (B, 1, S, R) and k_pe (B, 1,
    S, dr) as the float cache returns them."""
    if quantized is None or getattr(quantized, "core", None) is None or q_nope.shape[2] != 1:
        return None
    # The op takes one dtype per pair and returns q_nope's: a rounding the chain (float32
    # until the cast to dtype) does not make unless it is dtype's own.
    if q_pe.dtype != q_nope.dtype or k_pe.dtype != kv_latent.dtype or q_nope.dtype not in (mx.float32, dtype):
        return None
    dn, dr = q_nope.shape[-1], q_pe.shape[-1]
    S, R = kv_latent.shape[-2:]
    if _absorbed_cost(1, S, R, dn, dr, dv) > _expanded_cost(1, S, R, dn, dr, dv):
        return None  # S = 1: attend() takes the expanded form on the float32 copies
    return mla_decode_core(q_nope, q_pe, kv_latent, k_pe, scale=scale, **quantized.core)


class _FusedMLA:
    """Mixed in before an MLA attention class; see the module docstring."""

    def __call__(self, x, mask=None, cache=None):
        if mx.default_device() != mx.cpu or hasattr(cache, "bits"):
            return super().__call__(x, mask, cache)
        dense, up = _layer_state(self)
        if dense is None:
            return super().__call__(x, mask, cache)
        wk, wv = dense
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q_nope, q_pe, kv_latent, k_pe = project(self, x, offset)
        quantized = up if B * L <= QUANTIZED_ROWS else None
        cache_attend = getattr(cache, "attend", None)
        if cache_attend is not None:
            q_nope = q_nope.astype(mx.float32)
            q_lat = quantized[0](q_nope) if quantized else _nt(wk, q_nope).swapaxes(-1, -2)
            out = cache_attend(q_lat, q_pe.astype(mx.float32), kv_latent, k_pe, scale=self.scale, mask=mask)
            out = out.astype(mx.float32)
            out = quantized[1](out) if quantized else _nt(wv, out).swapaxes(-1, -2)
        else:
            if cache is not None:
                kv_latent, k_pe = cache.update_and_fetch(kv_latent, k_pe)
            out = None
            if L == 1 and mask is None:
                # A decode step: one primitive from q_nope to the value heads.
                out = _decode_core(
                    q_nope, q_pe, kv_latent, k_pe, self.scale, wv.shape[-2], quantized, x.dtype
                )
            if out is None:
                out = attend(q_nope, q_pe, kv_latent, k_pe, wk, wv, self.scale, mask, quantized)
        out = out.astype(x.dtype)
        # (B, H, L, dv) -> (B, L, H * dv); at one position the transpose is a reshape.
        out = out.reshape(B, 1, -1) if L == 1 else out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out)


def _rope_is_one_node(rope) -> bool:
    """Whether ``rope(x)`` is one graph node: moequant's rope primitive on the CPU (nn.RoPE,
    or YaRN without input scaling). Then ropeing q and k in two calls costs 2 nodes; the
    stacked call (a Concatenate, the rope, two Slices) 4. With MLX's CPU fallback (~36
    nodes a call) or YaRN's scaling ops, stacking saves the second call's nodes."""
    if mx.default_device() != mx.cpu:
        return False
    if isinstance(rope, _FusedYarnRoPE):
        return rope.mscale == 1.0
    return isinstance(rope, _FusedRoPE)


def project(attn, x, offset, with_qr=False):
    """The layer's queries and new latent entries, as DeepseekV3Attention makes them
    (projections, norm, rope; shared with moequant.kv_cache):
    q_nope (B, H, L, dn), roped q_pe (B, H, L, dr), kv_latent (B, 1, L, R), roped
    k_pe (B, 1, L, dr); with ``with_qr``, also the normed query latent qr (B, L,
    q_lora_rank) that deepseek_v32's indexer reads. The same values as mlx-lm's steps,
    with fewer view nodes (each costs a decode step a few us on the CPU stream)."""
    B, L, _ = x.shape
    qr = None
    kv = None
    if attn.q_lora_rank is None:
        q = attn.q_proj(x)
    else:
        # q_a_proj and kv_a_proj_with_mqa in one call when patch fused them.
        qa, kv = pair_linear(attn, _MLA_PAIR, x)
        qr = attn.q_a_layernorm(qa)
        q = attn.q_b_proj(qr)
    if L == 1:
        # One position: (B, 1, H, d) transposed to (B, H, 1, d) is a reshape.
        q = q.reshape(B, attn.num_heads, 1, attn.q_head_dim)
    else:
        q = q.reshape(B, L, attn.num_heads, attn.q_head_dim).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [attn.qk_nope_head_dim], axis=-1)
    # (B, L, R + dr) -> (B, 1, L, R + dr): the latent and k_pe of the one key head, both
    # in their cache layout (mlx-lm: a reshape and transpose of k_pe, an expand_dims of
    # the latent). The norm acts per row, on the strided view alike.
    kv = mx.expand_dims(attn.kv_a_proj_with_mqa(x) if kv is None else kv, axis=1)
    latent, k_pe = mx.split(kv, [attn.kv_lora_rank], axis=-1)
    latent = attn.kv_a_layernorm(latent)
    # Rope acts per (position, feature): one call for the query heads and the key head
    # stacked gives the same bits as two; it saves nodes only when a rope call is more
    # than one node (_rope_is_one_node).
    if q_pe.dtype == k_pe.dtype and not _rope_is_one_node(attn.rope):
        pe = attn.rope(mx.concatenate([q_pe, k_pe], axis=1), offset)
        q_pe, k_pe = pe[:, :-1], pe[:, -1:]
    else:
        q_pe, k_pe = attn.rope(q_pe, offset), attn.rope(k_pe, offset)
    out = (q_nope, q_pe, latent, k_pe)
    return out + (qr,) if with_qr else out


def patch_attention(model) -> int:
    """Route the MLA attention layers of ``model`` (see the module docstring), in place;
    returns how many layers will use the float32 path (layers with other up-projection
    layouts keep mlx-lm's call). Wraps the layer's current class, so it composes with
    other class swaps of these layers (``_moequant_base`` keeps naming mlx-lm's class,
    which ``moequant.unpatch`` restores). Idempotent."""
    bases = import_classes(_ATTENTION)
    n = 0
    for _, m in model.named_modules():
        cur = type(m)
        base = getattr(cur, "_moequant_base", cur)
        if base not in bases:
            continue
        if not issubclass(cur, _FusedMLA):
            if cur not in _mla_classes:
                _mla_classes[cur] = type(f"MLA{cur.__name__}", (_FusedMLA, cur), {"_moequant_base": base})
            m.__class__ = _mla_classes[cur]
        n += int(_dense_weights(m) is not None)
    return n
