"""Python-facing ops. Arguments are validated in C++ when the graph is built."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import mlx.core as mx

from . import _ext


def metal_status() -> Tuple[bool, str]:
    """``(available, reason)``: whether this install can run moequant's Metal kernels
    (built with them and the metallib present), and if not, why."""
    ok, reason = _ext.metal_status()
    return bool(ok), str(reason)


def metal_available() -> bool:
    """True when GPU-stream calls of moequant's ops can run (macOS, metallib built);
    ``metal_status()`` says why not."""
    return metal_status()[0]


# Kept for existing callers: the same as metal_available() at import time.
has_metal: bool = metal_available()


FITS = ("minmax", "mse")


def _check_ints(fn: str, **values) -> None:
    """ValueError naming the first argument that is not an int (bool is not one)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{fn}: {name} must be an int, got {v!r}")


def _check_arrays(fn: str, **arrays) -> None:
    """ValueError naming the first argument that is not an mx.array."""
    for name, a in arrays.items():
        if not isinstance(a, mx.array):
            raise ValueError(f"{fn}: {name} must be an mx.array, got {type(a).__name__}")


def _check_fit(fn: str, fit) -> str:
    if fit not in FITS:
        raise ValueError(f"{fn}: fit must be 'minmax' or 'mse', got {fit!r}")
    return fit


def _check_importance(fn: str, importance, K: int) -> Optional[mx.array]:
    """importance as a float32 (K,) array, or None; ValueError naming the argument."""
    if importance is None:
        return None
    try:
        h = importance if isinstance(importance, mx.array) else mx.array(importance)
    except Exception as e:  # noqa: BLE001 - anything unconvertible is a bad argument
        raise ValueError(f"{fn}: importance must be an array of K = {K} weights ({e})") from e
    if h.ndim != 1 or h.shape[0] != K:
        raise ValueError(
            f"{fn}: importance must have shape ({K},) (one weight per input channel), got {tuple(h.shape)}"
        )
    if not (mx.issubdtype(h.dtype, mx.floating) or mx.issubdtype(h.dtype, mx.integer) or h.dtype == mx.bool_):
        raise ValueError(f"{fn}: importance must be real-valued, got {h.dtype}")
    h = h.astype(mx.float32)
    ok = mx.all(mx.isfinite(h) & (h >= 0)).item()
    if not ok:
        raise ValueError(f"{fn}: importance must be finite and non-negative")
    return h


def requantize_int4(
    packed: mx.array,
    scales: mx.array,
    *,
    bits: int,
    group_size: int = 64,
    src_group_size: int = 32,
    dtype: Optional[mx.Dtype] = None,
    fit: str = "minmax",
    importance: Optional[mx.array] = None,
    stream=None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Re-quantize compressed-tensors INT4 weights to MLX's affine format in one pass.

    ``packed`` (int32 or uint32, shape ``(..., K/8)``) holds eight 4-bit codes per word,
    lowest bits first, stored as ``q + 8``; ``scales`` (``(..., K/src_group_size)``,
    float32/float16/bfloat16) gives the source weight ``(u - 8) * scale``.

    ``fit="minmax"`` (default) returns ``(wq, scales, biases)`` as
    ``mx.quantize(W, group_size, bits)`` would on the CPU for
    ``W = (u - 8) * float32(scale)``, bit for bit; scales and biases are then rounded to
    ``dtype`` (default: the dtype of the input scales).

    ``fit="mse"`` stores, per group, the (scale, bias) in ``dtype`` and the codes that
    minimize ``sum_k h_k (W_k - dequantize(...)_k)^2`` as far as the fit finds (see
    README, "The mse fit"); a group keeps min-max whenever the fit is not better, so no
    group is worse than ``mx.quantize``. Same layout, loads in stock mlx-lm.
    ``importance`` (length K, finite, non-negative, e.g. mean squared activations per
    input channel) gives the weights h_k (default 1); it needs ``fit="mse"``.
    """
    _check_fit("requantize_int4", fit)
    if fit == "minmax":
        if importance is not None:
            raise ValueError("requantize_int4: importance needs fit='mse'")
        return _ext.requantize_int4(
            packed,
            scales,
            bits=bits,
            group_size=group_size,
            src_group_size=src_group_size,
            dtype=dtype,
            stream=stream,
        )
    K = int(packed.shape[-1]) * 8 if isinstance(packed, mx.array) and packed.ndim else 0
    h = _check_importance("requantize_int4", importance, K)
    return _ext.requantize_int4_fit(
        packed,
        scales,
        h,
        bits=bits,
        group_size=group_size,
        src_group_size=src_group_size,
        dtype=dtype,
        stream=stream,
    )


def _on_cpu(stream) -> bool:
    """Whether an op given ``stream`` (None, a Device or a Stream) runs on the CPU."""
    if stream is None:
        return mx.default_device() == mx.cpu
    return getattr(stream, "device", stream) == mx.cpu


def quantize(
    w: mx.array,
    *,
    bits: int,
    group_size: int = 64,
    fit: str = "mse",
    dtype: Optional[mx.Dtype] = None,
    importance: Optional[mx.array] = None,
    stream=None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Affine-quantize float weights ``w`` (``(..., K)``, float32/float16/bfloat16) in
    ``mx.quantize``'s layout: ``(wq uint32 (..., K*bits/32), scales, biases)`` with
    scales and biases in ``dtype`` (default ``w.dtype``).

    ``fit="mse"`` (default): the error-optimal fit of ``requantize_int4(fit="mse")``
    on the float32 values of ``w``, never worse per group than ``mx.quantize``;
    ``importance`` (length K, finite, non-negative) weights each input channel's
    squared error. ``fit="minmax"``: exactly ``mx.quantize`` (scales and biases then
    rounded to ``dtype``). bits 2/3/4/5/6/8, group sizes 32/64/128.
    """
    _check_fit("quantize", fit)
    _check_arrays("quantize", w=w)
    if fit == "minmax":
        if importance is not None:
            raise ValueError("quantize: importance needs fit='mse'")
        _ext.check_quantize_args(w, bits=bits, group_size=group_size, dtype=dtype)
        if _on_cpu(stream):  # mx.quantize's bits, multi-threaded (tests/test_requantize.py)
            wq, s, b = _ext.quantize_minmax(w, bits=bits, group_size=group_size, stream=stream)
        else:
            wq, s, b = mx.quantize(w, group_size=group_size, bits=bits, stream=stream)
        out = dtype or w.dtype
        return wq, s.astype(out, stream=stream), b.astype(out, stream=stream)
    K = int(w.shape[-1]) if w.ndim else 0
    h = _check_importance("quantize", importance, K)
    return _ext.quantize_fit(w, h, bits=bits, group_size=group_size, dtype=dtype, stream=stream)


def get_num_threads() -> int:
    """Threads the CPU kernels use (``MOEQUANT_NUM_THREADS`` or the core count)."""
    return _ext.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the CPU kernels' thread count; ``n <= 0`` restores the default."""
    _ext.set_num_threads(int(n))


def huge_pages(tree: Any, *, collapse: bool = True, min_bytes: int = 4 << 20) -> int:
    """Back the large arrays in ``tree`` with transparent huge pages (Linux).

    ``tree`` is an ``mx.array``, an ``mlx.nn.Module`` (its parameters) or nested
    lists/tuples/dicts of arrays; arrays of at least ``min_bytes`` are evaluated and
    their memory advised with ``MADV_HUGEPAGE`` and, with ``collapse``, moved into huge
    pages now (``MADV_COLLAPSE``, Linux >= 6.1). Contents are unchanged. Streaming
    weights from 4 KiB pages costs a third of the read bandwidth on some machines
    (bench/RESULTS.md); decode reads every selected expert byte once per token.
    Returns the bytes advised (and, with ``collapse``, moved into huge pages): 0 where
    unsupported (macOS, THP disabled) or refused (no free huge pages).

    Memory allocated after ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` is set at process
    start gets huge pages at allocation, which is cheaper than collapsing later.
    """
    from mlx.utils import tree_flatten

    if isinstance(tree, mx.array):
        arrays = [tree]
    else:
        params = tree.parameters() if hasattr(tree, "parameters") else tree
        arrays = [v for _, v in tree_flatten(params) if isinstance(v, mx.array)]
    arrays = [a for a in arrays if a.nbytes >= min_bytes]
    mx.eval(arrays)
    return sum(_ext.advise_huge_pages(a, collapse) for a in arrays)


ProjLike = Union[
    Tuple[mx.array, mx.array, mx.array, int, int],
    Any,  # an object with weight, scales, biases, bits, group_size
]


def as_projection(p: ProjLike, name: str = "projection"):
    """(weight, scales, biases, bits, group_size) from a QuantizedSwitchLinear-like
    object or such a tuple; raises ValueError for layouts the fused op cannot run."""
    if isinstance(p, (tuple, list)):
        if len(p) != 5:
            raise ValueError(
                f"{name}: expected (weight, scales, biases, bits, group_size), got a sequence of {len(p)}"
            )
        w, s, b, bits, gs = p
    else:
        missing = [a for a in ("weight", "scales", "bits", "group_size") if not hasattr(p, a)]
        if missing:
            raise ValueError(f"{name}: {type(p).__name__} has no {', '.join(missing)}")
        mode = getattr(p, "mode", "affine")
        if mode != "affine":
            raise ValueError(f"{name}: only affine quantization is supported, got {mode!r}")
        if getattr(p, "global_scale", None) is not None:
            raise ValueError(f"{name}: a global scale is not supported")
        if isinstance(p, dict) and "bias" in p:
            raise ValueError(f"{name}: per-expert output biases are not supported")
        w, s, b = p.weight, p.scales, getattr(p, "biases", None)
        bits, gs = p.bits, p.group_size
    if b is None:
        raise ValueError(f"{name}: affine biases are required")
    return (w, s, b, int(bits), int(gs))


def moe_swiglu(
    x: mx.array,
    indices: mx.array,
    scores: mx.array,
    gate: ProjLike,
    up: ProjLike,
    down: ProjLike,
    *,
    stream=None,
) -> mx.array:
    """Fused MoE expert SwiGLU for decode.

    ``y[t] = sum_j scores[t, j] * down[e](silu(gate[e] @ x[t]) * (up[e] @ x[t]))`` with
    ``e = indices[t, j]``, accumulated in float32, returned in ``x.dtype`` with the shape
    of ``x``. ``x`` is ``(..., D)``; ``indices`` and ``scores`` are ``(..., k)``. Each
    projection is a stacked-expert affine-quantized matrix given as mlx-lm's
    ``QuantizedSwitchLinear`` (or anything with ``weight, scales, biases, bits,
    group_size``) or a tuple ``(weight, scales, biases, bits, group_size)``; bits
    2/3/4/5/6/8 and group sizes 32/64/128 may differ per projection.

    Expert ids (any integer dtype; 64-bit ids outside 32 bits are never narrowed into
    range) are data, so they are checked when the kernels run: an id outside [0, E) is
    never read, and the output row of each token with such an id is NaN, on every
    backend (a Metal kernel cannot raise). Everything else, shapes and dtypes
    included (hidden size at least 1, at most 2^31 - 1 tokens, one scales dtype for gate
    and up), is checked when the graph is built (ValueError), the same on every backend.

    On AVX-512 VNNI CPUs, 2/3/4-bit projections multiply integer codes by x held per
    affine group as a fixed point (24 bits of the group's largest |x| for float32
    activations, 16 for bf16/f16); the error stays at float32 (bf16) rounding level of
    the output, and a group with inf or NaN makes its rows NaN.
    """
    return _moe_call(_ext.moe_swiglu, x, indices, scores, gate, up, down, stream)


def _moe_call(fn, x, indices, scores, gate, up, down, stream):
    projs = (as_projection(p, n) for p, n in ((gate, "gate"), (up, "up"), (down, "down")))
    return fn(x, indices, scores, *projs, stream=stream)


def moe_prefill(
    x: mx.array,
    indices: mx.array,
    scores: mx.array,
    gate: ProjLike,
    up: ProjLike,
    down: ProjLike,
    *,
    stream=None,
) -> mx.array:
    """``moe_swiglu``'s function for many tokens (prefill, evaluation), on the CPU.

    Same arguments, semantics, dtypes and errors as ``moe_swiglu``. The tokens are
    grouped by selected expert and each selected expert runs as quantized GEMMs over
    its tokens (gate and up, SwiGLU in float32, down), so its weights are read once per
    call (per ~2k tokens of a 2048-wide model, ~600 of Kimi's) instead of once per
    token; then the score-weighted sum per token, in slot order. Multi-threaded over
    (expert, row tile); results do not depend on the thread count. The GPU has no
    kernel for it (MLX's ``gather_qmm`` batches there): a GPU stream raises when
    evaluated.
    """
    return _moe_call(_ext.moe_prefill, x, indices, scores, gate, up, down, stream)


def moe_cpu_path() -> str:
    """Which CPU kernels moe_swiglu runs: "avx512vnni" (integer kernels for 2/3/4-bit
    rows, float AVX-512 for the others), "avx512", "avx2int" (integer AVX2 kernels where
    they beat the float ones, float AVX2 for the others), "avx2" or "scalar": the best this
    CPU supports, capped by MOEQUANT_CPU_PATH=avx512, =avx2int, =avx2 or =scalar."""
    return _ext.moe_cpu_path()


def quantized_linear(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int,
    stream=None,
) -> mx.array:
    """``x @ dequantize(w, scales, biases).T`` for one affine-quantized matrix.

    The semantics of ``mx.quantized_matmul(x, w, scales, biases, transpose=True,
    group_size=group_size, bits=bits)``: ``x`` is ``(..., K)`` float32/float16/bfloat16,
    ``w`` ``(N, K * bits / 32)`` uint32, ``scales`` and ``biases`` ``(N, K / group_size)``
    of one float dtype; bits 2/3/4/5/6/8, group sizes 32/64/128. Accumulates in float32
    and returns ``(..., N)`` in ``x.dtype``. Bad arguments raise ValueError naming the
    argument when the graph is built.

    CPU: a weight-streaming GEMV for up to 4 rows of x, a GEMM (weights decoded tile by
    tile into cache and reused across the rows) for more; multi-threaded
    (``set_num_threads``). GPU streams run MLX's own ``quantized_matmul``.
    """
    _check_ints("quantized_linear", bits=bits, group_size=group_size)
    _check_arrays("quantized_linear", x=x, w=w, scales=scales, biases=biases)
    return _ext.quantized_linear(x, w, scales, biases, bits=bits, group_size=group_size, stream=stream)


def quantized_multi_linear(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int,
    stream=None,
) -> mx.array:
    """``x @ dequantize(w, scales, biases).swapaxes(-1, -2)`` with one affine-quantized
    matrix per head (mlx-lm's ``QuantizedMultiLinear``, the MLA up-projections).

    The semantics of ``mx.quantized_matmul(x, w, scales, biases, transpose=True,
    group_size=group_size, bits=bits)`` on a stacked weight: ``x`` is ``(..., H, M, K)``
    float32/float16/bfloat16, ``w`` ``(H, N, K * bits / 32)`` uint32, ``scales`` and
    ``biases`` ``(H, N, K / group_size)`` of one float dtype; bits 2/3/4/5/6/8, group
    sizes 32/64/128. Accumulates in float32 and returns ``(..., H, M, N)`` in
    ``x.dtype``. Bad arguments raise ValueError naming the argument.

    CPU: the weight-streaming row kernels of ``quantized_linear``'s decode GEMV over
    (head, chunk of rows), each weight byte read once per call (meant for decode steps:
    M rows per head reuse a chunk of rows from cache); multi-threaded. GPU streams run
    MLX's own ``quantized_matmul``.
    """
    _check_ints("quantized_multi_linear", bits=bits, group_size=group_size)
    _check_arrays("quantized_multi_linear", x=x, w=w, scales=scales, biases=biases)
    return _ext.quantized_multi_linear(x, w, scales, biases, bits=bits, group_size=group_size, stream=stream)


def matmul_nt(a: mx.array, b: mx.array, *, stream=None) -> mx.array:
    """``a @ b.swapaxes(-1, -2)`` in float32: ``a`` (..., M, K) and ``b`` (..., N, K)
    float32 with the same leading dimensions -> (..., M, N). CPU: the quantized GEMM's
    register-blocked micro-kernel on float rows, multi-threaded (MLX's CPU matmul calls
    the reference BLAS bundled with mlx[cpu] on Linux, ~1 GFLOP/s); GPU streams run
    ``mx.matmul``. Bad arguments raise ValueError naming them."""
    _check_arrays("matmul_nt", a=a, b=b)
    return _ext.matmul_nt(a, b, stream=stream)


def dense_linear(x: mx.array, w: mx.array, *, stream=None) -> mx.array:
    """``x @ w.T`` for a float weight ``w`` (N, K) and ``x`` (..., K) (float32, float16
    or bfloat16 each), in their promoted dtype, with the bits of MLX's CPU matmul on
    Linux: per output the sequential float32 sum over k of the rounded products, then
    one rounding to the result dtype. CPU: the rows split across threads, eight outputs
    per vector, the weight read once in its own dtype (MLX: one thread, and a float32
    copy of a bf16 weight for float32 x); the result does not depend on the thread
    count. GPU streams run ``mx.matmul``. Bad arguments raise ValueError naming them."""
    _check_arrays("dense_linear", x=x, w=w)
    return _ext.dense_linear(x, w, stream=stream)


def softmax_rows(s: mx.array, mask=None, *, scale: float = 1.0, stream=None) -> mx.array:
    """``softmax(scale * s)`` along the last axis over the positions ``mask`` allows
    (masked ones get 0): ``s`` (..., L, S) float32, ``mask`` (L, S) bool shared by every
    leading index, or None. A fully masked row gets the uniform distribution (as
    softmax over equal minimal values). CPU: one pass per row skipping masked positions
    (MLX's CPU softmax runs at ~10-40 M elements/s here); GPU streams run MLX ops."""
    if not isinstance(s, mx.array) or not (mask is None or isinstance(mask, mx.array)):
        raise ValueError("softmax_rows: s and mask must be mx.array (mask may be None)")
    return _ext.softmax_rows(s, mask, scale=float(scale), stream=stream)


def quantized_embedding(
    ids: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int, stream=None
) -> mx.array:
    """``mx.dequantize(w[ids], scales[ids], biases[ids], group_size, bits)`` (what
    ``nn.QuantizedEmbedding`` returns), bit for bit: ids (...) int32/int64/uint32 ->
    (..., K) in the scales' dtype. CPU: one primitive (MLX's CPU path is ~56 primitives);
    GPU streams run MLX's ops. Bad arguments raise ValueError naming them."""
    _check_arrays("quantized_embedding", ids=ids, w=w, scales=scales, biases=biases)
    return _ext.quantized_embedding(ids, w, scales, biases, bits=bits, group_size=group_size, stream=stream)


def rms_norm(x: mx.array, weight: Optional[mx.array], eps: float, *, stream=None) -> mx.array:
    """``mx.fast.rms_norm(x, weight, eps)``, bit for bit. CPU: one primitive that computes
    what MLX 0.32's CPU fallback graph computes (12 primitives there, ~8 us each at
    decode); GPU streams, float64 and bad arguments go to ``mx.fast.rms_norm`` itself."""
    if not isinstance(x, mx.array) or not (weight is None or isinstance(weight, mx.array)):
        raise ValueError("rms_norm: x and weight must be mx.array (weight may be None)")
    return _ext.rms_norm(x, weight, float(eps), stream=stream)


def rope(
    x: mx.array,
    dims: int,
    *,
    traditional: bool,
    base: Optional[float],
    scale: float,
    offset: Union[int, mx.array],
    freqs: Optional[mx.array] = None,
    stream=None,
) -> mx.array:
    """``mx.fast.rope(x, dims, traditional=, base=, scale=, offset=, freqs=)``, bit for
    bit. CPU: one primitive that computes what MLX 0.32's CPU fallback graph computes
    (~36 primitives there); GPU streams and bad arguments go to ``mx.fast.rope``."""
    if not isinstance(x, mx.array) or not (freqs is None or isinstance(freqs, mx.array)):
        raise ValueError("rope: x and freqs must be mx.array (freqs may be None)")
    if isinstance(offset, bool) or not isinstance(offset, (int, mx.array)):
        raise ValueError(f"rope: offset must be an int or an mx.array, got {type(offset).__name__}")
    return _ext.rope(
        x,
        int(dims),
        traditional=bool(traditional),
        base=None if base is None else float(base),
        scale=float(scale),
        offset=offset,
        freqs=freqs,
        stream=stream,
    )


def qgemm_path() -> str:
    """The micro-kernel of the quantized GEMM: "avx2" or "scalar" (MOEQUANT_CPU_PATH caps
    it like the row kernels)."""
    return _ext.qgemm_path()


QuantTriple = Tuple[mx.array, mx.array, mx.array]


def _triples(fn: str, first: str, **triples) -> list:
    """The arrays of each named (first, scales, biases) triple, in order; ValueError naming
    the argument when one is not a triple of mx.array."""
    parts = []
    for name, t in triples.items():
        if not isinstance(t, (tuple, list)) or len(t) != 3:
            raise ValueError(f"{fn}: {name} must be ({first}, scales, biases)")
        for a in t:
            if not isinstance(a, mx.array):
                raise ValueError(f"{fn}: {name} holds a {type(a).__name__}, not an mx.array")
        parts.extend(t)
    return parts


def mla_decode_attention(
    q_lat: mx.array,
    q_pe: mx.array,
    latent: QuantTriple,
    k_pe: QuantTriple,
    *,
    scale: float,
    bits: int,
    group_size: int,
    stream=None,
) -> mx.array:
    """One decode step of MLA's absorbed attention, read directly from a quantized
    latent cache.

    ``q_lat`` ``(B, H, R)`` is the query mapped into latent space (``embed_q(q_nope)``),
    ``q_pe`` ``(B, H, DR)`` its roped part; ``latent`` and ``k_pe`` are the cache's
    ``(codes, scales, biases)`` as ``mx.quantize`` makes them for ``(B, T, R)`` and
    ``(B, T, DR)`` (a ``(B, 1, T, ...)`` head axis is accepted and dropped). Returns
    ``softmax_t(scale * (q_lat . latent_t + q_pe . k_pe_t)) @ latent`` ``(B, H, R)`` in
    ``q_lat``'s dtype (``unembed_out`` then maps it to the value heads). 4 or 8 bits,
    group size 32/64/128 dividing R and DR.

    CPU: dequantizes on the fly in float32, accumulates in float32, numerically stable
    (online) softmax; every cached byte is read once per call; threads over position
    chunks x heads, chunks merged in a fixed order (the result does not depend on the
    thread count). GPU streams run moequant's Metal kernels (metal/mla_attention.metal,
    R <= 512, DR <= 128); without them a GPU stream raises RuntimeError saying why. Bad
    arguments raise ValueError naming the argument when the graph is built.
    """
    _check_ints("mla_decode_attention", bits=bits, group_size=group_size)
    parts = _triples("mla_decode_attention", "codes", latent=latent, k_pe=k_pe)
    parts = [a.squeeze(1) if a.ndim == 4 and a.shape[1] == 1 else a for a in parts]
    return _ext.mla_decode_attention(
        q_lat, q_pe, *parts, scale=float(scale), bits=bits, group_size=group_size, stream=stream
    )


def _pair(fn: str, name: str, v) -> Tuple[int, int]:
    """An int for both up-projections, or a pair (embed_q's, unembed_out's)."""
    pair = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(pair) != 2:
        raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}")
    _check_ints(fn, **{f"{name}[0]": pair[0], f"{name}[1]": pair[1]})
    return pair


def _mla_core_args(fn, q_nope, q_pe, latent, k_pe, embed_q, unembed_out, bits, group_size):
    _check_arrays(fn, q_nope=q_nope, q_pe=q_pe, latent=latent, k_pe=k_pe)
    parts = _triples(fn, "weight", embed_q=embed_q, unembed_out=unembed_out)
    (qb, ob), (qg, og) = _pair(fn, "bits", bits), _pair(fn, "group_size", group_size)
    return [q_nope, q_pe, latent, k_pe, *parts], dict(q_bits=qb, q_group_size=qg, o_bits=ob, o_group_size=og)


def mla_decode_core(
    q_nope: mx.array,
    q_pe: mx.array,
    latent: mx.array,
    k_pe: mx.array,
    embed_q: QuantTriple,
    unembed_out: QuantTriple,
    *,
    scale: float,
    bits,
    group_size,
    stream=None,
) -> mx.array:
    """One decode step of MLA's absorbed attention over a float KV cache, from the query
    heads to the value heads, as one primitive on the CPU.

    ``q_nope`` ``(B, H, dn)`` and roped ``q_pe`` ``(B, H, dr)`` of one float dtype (a
    ``(B, H, 1, d)`` decode query is taken as it is); ``latent`` ``(B, S, R)`` and
    ``k_pe`` ``(B, S, dr)`` as a float cache holds them, one float dtype, any strides (a
    ``(B, 1, S, d)`` cache view is taken as it is, without a copy); ``embed_q`` and
    ``unembed_out`` the ``(weight, scales, biases)`` of mlx-lm's ``QuantizedMultiLinear``
    up-projections, ``(H, R, dn)`` and ``(H, dv, R)`` affine-quantized; ``bits`` and
    ``group_size`` an int for both or a pair (embed_q's, unembed_out's), bits
    2/3/4/5/6/8, group sizes 32/64/128. Returns ``unembed_out(softmax(scale * (embed_q(q_nope)
    . latent + q_pe . k_pe)) @ latent)`` ``(B, H, dv)`` in ``q_nope``'s dtype, float32
    arithmetic.

    CPU: the op-by-op chain's kernels in its order (``quantized_multi_linear``,
    ``matmul_nt``, ``softmax_rows``, ``matmul_nt``, ``quantized_multi_linear``) inside one
    task: bit-identical to that chain, independent of the thread count. GPU streams run
    the same math in MLX's ops. Bad arguments raise ValueError naming the argument.
    """
    fn = "mla_decode_core"
    arrays, kw = _mla_core_args(fn, q_nope, q_pe, latent, k_pe, embed_q, unembed_out, bits, group_size)
    return _ext.mla_decode_core(*arrays, scale=float(scale), **kw, stream=stream)


def _mla_decode_core_mlx_graph(
    q_nope, q_pe, latent, k_pe, embed_q, unembed_out, *, scale, bits, group_size, stream=None
):
    """Test only: mla_decode_core's GPU form (MLX's ops) on any stream."""
    fn = "mla_decode_core"
    arrays, kw = _mla_core_args(fn, q_nope, q_pe, latent, k_pe, embed_q, unembed_out, bits, group_size)
    return _ext._mla_decode_core_mlx_graph(*arrays, scale=float(scale), **kw, stream=stream)


def mla_cpu_path() -> str:
    """The kernel mla_decode_attention runs on the CPU: "avx2" or "scalar"
    (MOEQUANT_CPU_PATH=scalar caps it)."""
    return _ext.mla_cpu_path()
