"""The mse fit (requantize_int4(fit="mse"), quantize): bit-exact against its numpy
specification (moequant.testing.fit_reference) on every CPU path and thread count;
never worse per group than mx.quantize, measured in float64 on what mx.dequantize
reconstructs; better by a margin on Kimi-like INT4 data; argument errors."""

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import moequant
from int4_reference import MX_DTYPES, dequantize_exact, pack_int4, unpack_int4
from metal_emulator import requantize_check as rq
from moequant.testing import fit_reference as fr

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]
DTYPES = ["float32", "float16", "bfloat16"]


def bits_of(a):
    view = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}
    return np.array(a.view(view.get(a.dtype, a.dtype)))


def assert_same(ours, ref):
    for name, a, b in zip(("wq", "scales", "biases"), ours, ref):
        a = a if isinstance(a, np.ndarray) else bits_of(a)
        b = b if isinstance(b, np.ndarray) else bits_of(b)
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        bad = int((a != b).sum())
        assert bad == 0, f"{name}: {bad} of {a.size} differ"


def ref_bits(x, dtype):
    """float32 values of T -> T's bit patterns as numpy."""
    return bits_of(mx.array(np.asarray(x, np.float32)).astype(MX_DTYPES[dtype]))


def structured(K=128):
    """INT4 rows that stress the fit: constant groups, all -8, all +7, zero, huge, tiny,
    negative and mixed scales, two-valued and half/half rows, plus random rows."""
    packed, scales = rq.structured_inputs("float32", K=K)
    return unpack_int4(np.array(packed.view(np.int32))), np.array(scales)


def kimi_like(rng, rows, K, codes):
    return fr.kimi_like_int4(rng, rows, K, codes=codes)


def run_int4(q, s, src_dtype, **kw):
    packed = mx.array(pack_int4(q))
    scales = mx.array(s).astype(MX_DTYPES[src_dtype])
    return moequant.requantize_int4(packed, scales, fit="mse", **kw), packed, scales


@pytest.mark.parametrize("bits", BITS)
def test_int4_matches_reference(bits):
    """Every group size x source group size x scale dtype x output dtype, random and
    structured rows: the kernel equals the numpy specification bit for bit."""
    rng = np.random.default_rng(bits)
    q0, s0 = kimi_like(rng, 5, 384, "gaussian")
    for g in GROUPS:
        for sg in GROUPS:
            for src in DTYPES:
                out = DTYPES[(g + sg + bits) % 3]
                sg_s = fr.kimi_like_int4(rng, 5, 384, sg=sg)[1]
                ours, packed, scales = run_int4(
                    q0, sg_s, src, bits=bits, group_size=g, src_group_size=sg, dtype=MX_DTYPES[out]
                )
                sf = np.array(scales.astype(mx.float32))
                wq, s, b, _ = fr.fit_int4(q0, sf, bits, g, sg, out)
                assert_same(ours, (wq, ref_bits(s, out), ref_bits(b, out)))
    q, s = structured()
    for src in DTYPES:
        for g in GROUPS:
            ours, packed, scales = run_int4(q, s, src, bits=bits, group_size=g)
            sf = np.array(scales.astype(mx.float32))
            wq, sr, br, _ = fr.fit_int4(q, sf, bits, g, 32, src)
            assert_same(ours, (wq, ref_bits(sr, src), ref_bits(br, src)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_matches_reference(dtype):
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((6, 256)) * 0.02).astype(np.float32)
    w[0] = 0.5  # constant group
    w[1, :64] = 0.0
    w[2] *= 1e4
    w[3] *= 1e-6
    x = mx.array(w).astype(MX_DTYPES[dtype])
    xf = np.array(x.astype(mx.float32))
    h = rng.random(256).astype(np.float32)
    h[:7] = 0.0
    for bits in BITS:
        for g in GROUPS:
            for imp in (None, h):
                ours = moequant.quantize(x, bits=bits, group_size=g, importance=imp)
                wq, s, b, _ = fr.fit_float(xf, bits, g, dtype, imp)
                assert_same(ours, (wq, ref_bits(s, dtype), ref_bits(b, dtype)))


def test_importance_matches_reference():
    rng = np.random.default_rng(5)
    q, s = kimi_like(rng, 7, 512, "laplace")
    h = (rng.random(512) ** 3).astype(np.float32)
    h[100:140] = 0.0
    for bits in (3, 4):
        ours, packed, scales = run_int4(q, s, "bfloat16", bits=bits, group_size=64, importance=mx.array(h))
        sf = np.array(scales.astype(mx.float32))
        wq, sr, br, _ = fr.fit_int4(q, sf, bits, 64, 32, "bfloat16", h)
        assert_same(ours, (wq, ref_bits(sr, "bfloat16"), ref_bits(br, "bfloat16")))


def test_paths_and_threads_identical(monkeypatch):
    """AVX2 vs scalar path, 1 vs all threads: the same bits."""
    rng = np.random.default_rng(2)
    q, s = kimi_like(rng, 64, 1024, "flat")
    w = mx.array((rng.standard_normal((32, 512)) * 0.02).astype(np.float32)).astype(mx.bfloat16)
    outs = []
    old = moequant.get_num_threads()
    try:
        for path in ("", "scalar"):
            for threads in (1, max(2, os.cpu_count() or 2)):
                monkeypatch.setenv("MOEQUANT_CPU_PATH", path)
                moequant.set_num_threads(threads)
                a, _, _ = run_int4(q, s, "bfloat16", bits=3, group_size=64)
                b = moequant.quantize(w, bits=4, group_size=64)
                mx.eval(a, b)
                outs.append([bits_of(x) for x in (*a, *b)])
    finally:
        moequant.set_num_threads(old)
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            assert np.array_equal(x, y)


def edge_rows(rng, K=256):
    """INT4 rows (codes, float32 scales) for the AVX2 path's exact shortcuts and their
    fallbacks: a group minimum or maximum of +0 and -0 (blocks of opposite-sign
    scales: the sequential loop keeps the first), absent nibbles whose value overflows
    (|(u - 8) * scale| = inf while the present ones are finite: t not finite), tied
    candidate errors (two-valued and near-constant groups), and random rows."""
    n = K // 32
    rows = []
    for sign in (1.0, -1.0):  # min = +-0: all values >= 0; max = +-0: all values <= 0
        q = np.where(np.arange(K) // 32 % 2 == 0, rng.integers(0, 8, K), rng.integers(-7, 1, K))
        s = np.resize(np.array([0.01, -0.01], np.float32), n) * sign
        q[::32] = 0  # every block holds its zero
        rows.append((q, s))
    q = rng.integers(0, 2, K)  # present nibbles 8, 9 only: -8 * 3e38 = -inf is absent
    rows.append((q, np.full(n, 3e38, np.float32)))
    rows.append((np.tile([-8, 7], K // 2), np.full(n, 0.02, np.float32)))
    q = np.full(K, 2)
    q[::17] = 3
    rows.append((q, np.full(n, 0.5, np.float32)))
    for _ in range(3):
        rows.append((rng.integers(-8, 8, K), (0.004 * np.exp(rng.standard_normal(n))).astype(np.float32)))
    return np.stack([r for r, _ in rows]).astype(np.int8), np.stack([x for _, x in rows])


def test_edge_groups_every_path(monkeypatch):
    """The AVX2 path's shortcuts (vector min/max, skipped zero-weight slots, the
    vector top-4, the interleaved neighbour errors) and their fallbacks equal the
    specification on both paths and thread counts, with unit and zero importance."""
    rng = np.random.default_rng(13)
    q, s = edge_rows(rng)
    h = rng.random(256).astype(np.float32)
    h[40:90] = 0.0
    old = moequant.get_num_threads()
    try:
        for path in ("", "scalar"):
            monkeypatch.setenv("MOEQUANT_CPU_PATH", path)
            for threads in (1, 2):
                moequant.set_num_threads(threads)
                for bits in (2, 3, 4, 8):
                    for imp in (None, h):
                        ours, _, scales = run_int4(
                            q,
                            s,
                            "float32",
                            bits=bits,
                            group_size=64,
                            importance=None if imp is None else mx.array(imp),
                        )
                        sf = np.array(scales)
                        wq, sr, br, _ = fr.fit_int4(q, sf, bits, 64, 32, "float32", imp)
                        assert_same(ours, (wq, ref_bits(sr, "float32"), ref_bits(br, "float32")))
    finally:
        moequant.set_num_threads(old)


def sq_err64(w, wq, s, b, bits, g, h=None):
    """float64 error per group of exactly what mx.dequantize reconstructs."""
    d = np.array(mx.dequantize(wq, s, b, group_size=g, bits=bits).astype(mx.float32), np.float64)
    r = np.asarray(w, np.float64) - d
    rows, K = r.shape
    e = (r * r).reshape(rows, K // g, g)
    if h is not None:
        e = e * np.asarray(h, np.float64).reshape(K // g, g)
    return e.sum(-1)


@pytest.mark.parametrize("src", ["bfloat16", "float16", "float32"])
def test_never_worse_int4(src):
    """Random Kimi-like rows of three code distributions, spreads from 1x to 100x, and
    the structured rows, every bits x group size: no group worse than min-max."""
    rng = np.random.default_rng(hash(src) % 1000)
    qs, ss = [], []
    for codes in ("flat", "gaussian", "laplace"):
        for spread in (1.0, 10.0, 100.0):
            q, s = fr.kimi_like_int4(rng, 8, 512, codes=codes, spread=spread)
            qs.append(q)
            ss.append(s)
    q, s = structured(512)
    qs.append(q)
    ss.append(s)
    if src == "float16":  # keep the scales representable
        ss[-1] = np.where(np.abs(ss[-1]) > 6e4, 6e4, ss[-1]).astype(np.float32)
    q = np.concatenate(qs)
    s = np.concatenate(ss)
    packed = mx.array(pack_int4(q))
    scales = mx.array(s).astype(MX_DTYPES[src])
    w = np.array(dequantize_exact(packed, scales, 32))
    n_better = 0
    for bits in BITS:
        for g in GROUPS:
            mm = moequant.requantize_int4(packed, scales, bits=bits, group_size=g)
            ms = moequant.requantize_int4(packed, scales, bits=bits, group_size=g, fit="mse")
            e_mm = sq_err64(w, *mm, bits, g)
            e_ms = sq_err64(w, *ms, bits, g)
            finite = np.isfinite(e_mm)
            worse = finite & (e_ms > e_mm)
            assert not worse.any(), f"bits {bits} g {g}: {worse.sum()} groups worse"
            n_better += int((e_ms < e_mm).sum())
    assert n_better > 0


def test_never_worse_float_and_importance():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((16, 512)) * np.exp(rng.standard_normal((16, 1)))).astype(np.float32)
    w[0, :128] = 1.0
    w[1, :64] = -3.0
    x = mx.array(w).astype(mx.bfloat16)
    wf = np.array(x.astype(mx.float32))
    h = rng.random(512).astype(np.float32) ** 2
    for bits in BITS:
        for g in GROUPS:
            mm = mx.quantize(x, group_size=g, bits=bits)
            for imp in (None, h):
                ms = moequant.quantize(x, bits=bits, group_size=g, importance=imp)
                e_mm = sq_err64(wf, *mm, bits, g, imp)
                e_ms = sq_err64(wf, *ms, bits, g, imp)
                assert not (e_ms > e_mm).any(), f"bits {bits} g {g}"


def test_better_by_a_margin():
    """The generator of fit_reference.kimi_like_int4 (per-32 bf16 scales log-normal,
    95th/5th percentile ratio 10, base 0.004) and compressed-tensors' quantization of
    bf16 Gaussian weights with that scale spread: squared weight error at 3-bit g64
    >= 30% below min-max, at 4-bit g64 >= 20% below."""
    rng = np.random.default_rng(13)
    cases = {"flat": fr.kimi_like_int4(rng, 256, 1024, codes="flat")}
    cases["ct-gaussian"] = fr.ct_gaussian_int4(rng, 256, 1024, spread=10.0)
    for name, (q, s) in cases.items():
        packed = mx.array(pack_int4(q))
        scales = mx.array(s).astype(mx.bfloat16)
        w = np.array(dequantize_exact(packed, scales, 32))
        for bits, need in ((3, 0.30), (4, 0.20)):
            mm = moequant.requantize_int4(packed, scales, bits=bits, group_size=64)
            ms = moequant.requantize_int4(packed, scales, bits=bits, group_size=64, fit="mse")
            gain = 1 - sq_err64(w, *ms, bits, 64).sum() / sq_err64(w, *mm, bits, 64).sum()
            assert gain >= need, f"{name} {bits}-bit: {gain:.3f} < {need}"


def test_loads_as_quantized_linear():
    """mlx's QuantizedLinear (what mlx-lm builds) on the fit's output computes
    x @ dequantize(...)^T."""
    rng = np.random.default_rng(9)
    q, s = fr.kimi_like_int4(rng, 64, 256)
    wq, sc, bi = moequant.requantize_int4(
        mx.array(pack_int4(q)), mx.array(s).astype(mx.bfloat16), bits=3, group_size=64, fit="mse"
    )
    layer = nn.QuantizedLinear(256, 64, bias=False, group_size=64, bits=3)
    layer.weight, layer.scales, layer.biases = wq, sc, bi
    x = mx.array(rng.standard_normal((3, 256)).astype(np.float32)).astype(mx.bfloat16)
    want = x @ mx.dequantize(wq, sc, bi, group_size=64, bits=3).T
    assert mx.allclose(layer(x).astype(mx.float32), want.astype(mx.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_minmax_quantize_is_mx_quantize(dtype):
    """fit="minmax" (moequant's multi-threaded quantize_minmax on the CPU) gives
    mx.quantize's bits, scales and biases rounded to `dtype`, for views too."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 40, 256)).astype(np.float32)).astype(MX_DTYPES[dtype])
    xt = mx.swapaxes(x, 0, 1)  # non-contiguous
    for bits in BITS:
        g = GROUPS[bits % 3]
        for w in (x, xt):
            ours = moequant.quantize(w, bits=bits, group_size=g, fit="minmax")
            assert_same(ours, mx.quantize(w, group_size=g, bits=bits))
    ours = moequant.quantize(x, bits=4, group_size=64, fit="minmax", dtype=mx.float16)
    wq, s, b = mx.quantize(x, group_size=64, bits=4)
    assert_same(ours, (wq, s.astype(mx.float16), b.astype(mx.float16)))
    assert_same(moequant.quantize(x, bits=4, group_size=64, fit="minmax", stream=mx.cpu), (wq, s, b))


def test_mse_views_read_in_place():
    """The mse fit reads an evaluated row-contiguous view into a larger buffer in place
    (convert's pieces: no copy of the input), and a transposed view gives the bits of the
    same values passed contiguous."""
    rng = np.random.default_rng(23)
    q, s = kimi_like(rng, 768, 512, "laplace")
    packed = mx.array(pack_int4(q))
    scales = mx.array(s).astype(mx.bfloat16)
    wnp = rng.standard_normal((768, 512)).astype(np.float32) * 0.02
    w = mx.array(wnp).astype(mx.bfloat16)
    pv, sv, wv = packed.view(mx.uint32)[:512], scales[:512], w[:512]  # views of the first 512 rows
    mx.eval(w, pv, sv, wv)
    # The same values in arrays of their own.
    ref = moequant.requantize_int4(
        mx.array(pack_int4(q[:512])), mx.array(s[:512]).astype(mx.bfloat16), bits=3, group_size=64, fit="mse"
    )
    wref = moequant.quantize(mx.array(wnp[:512]).astype(mx.bfloat16), bits=4, group_size=64)
    mx.eval(ref, wref)
    for run, want, view_bytes in (
        (lambda: moequant.requantize_int4(pv, sv, bits=3, group_size=64, fit="mse"), ref, pv.nbytes),
        (lambda: moequant.quantize(wv, bits=4, group_size=64), wref, wv.nbytes),
    ):
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        ours = run()
        mx.eval(ours)
        grown = mx.get_peak_memory() - base
        out_bytes = sum(a.nbytes for a in ours)
        assert grown < out_bytes + view_bytes // 2, f"{grown} bytes allocated for {out_bytes} of output"
        assert_same(ours, want)
    wt = mx.swapaxes(w.reshape(2, 384, 512), 0, 1)
    wt_own = mx.array(np.swapaxes(wnp.reshape(2, 384, 512), 0, 1).copy()).astype(mx.bfloat16)
    assert_same(
        moequant.quantize(wt, bits=3, group_size=32), moequant.quantize(wt_own, bits=3, group_size=32)
    )


def test_argument_errors():
    rng = np.random.default_rng(0)
    q, s = fr.kimi_like_int4(rng, 2, 128)
    packed, scales = mx.array(pack_int4(q)), mx.array(s)
    w = mx.zeros((2, 128))
    with pytest.raises(ValueError, match="fit must be"):
        moequant.requantize_int4(packed, scales, bits=3, fit="best")
    with pytest.raises(ValueError, match="fit must be"):
        moequant.quantize(w, bits=3, fit="MSE")
    with pytest.raises(ValueError, match="importance must have shape"):
        moequant.requantize_int4(packed, scales, bits=3, fit="mse", importance=mx.ones((64,)))
    with pytest.raises(ValueError, match="non-negative"):
        moequant.quantize(w, bits=3, importance=-mx.ones((128,)))
    with pytest.raises(ValueError, match="finite"):
        moequant.quantize(w, bits=3, importance=mx.full((128,), float("nan")))
    with pytest.raises(ValueError, match="needs fit='mse'"):
        moequant.requantize_int4(packed, scales, bits=3, importance=mx.ones((128,)))
    with pytest.raises(ValueError, match="bits must be"):
        moequant.quantize(w, bits=7)
    with pytest.raises(ValueError, match="bits must be"):
        moequant.quantize(w, bits=7, fit="minmax")
    with pytest.raises(ValueError, match="group_size must be"):
        moequant.requantize_int4(packed, scales, bits=3, group_size=48, fit="mse")
    with pytest.raises(ValueError, match="w must be float32"):
        moequant.quantize(mx.zeros((2, 128), dtype=mx.int32), bits=3)
    with pytest.raises(ValueError, match="divisible by group_size"):
        moequant.quantize(mx.zeros((2, 96)), bits=3, group_size=64)
    with pytest.raises(ValueError, match="w must be an mx.array"):
        moequant.quantize(np.zeros((2, 128), np.float32), bits=3)
