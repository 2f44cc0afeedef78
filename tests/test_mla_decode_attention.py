"""moequant.mla_decode_attention (CPU) against a float64 oracle on the dequantized
cache, on every CPU path, thread counts and dtypes; argument errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import moequant
from mla_reference import make_case, mla_decode_reference, rel_err


def run(c, scale, bits, gs):
    q_lat, q_pe, lat, pe = c
    y = moequant.mla_decode_attention(q_lat, q_pe, lat, pe, scale=scale, bits=bits, group_size=gs)
    mx.eval(y)
    return y


@pytest.fixture(params=["avx2", "scalar"])
def cpu_path(request, monkeypatch):
    if request.param == "avx2" and moequant.mla_cpu_path() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA")
    if request.param == "scalar":
        monkeypatch.setenv("MOEQUANT_CPU_PATH", "scalar")
    assert moequant.mla_cpu_path() == request.param
    return request.param


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("B,H,T", [(1, 4, 1), (1, 5, 37), (2, 3, 600), (1, 8, 1100)])
def test_against_float64(cpu_path, bits, gs, B, H, T):
    rng = np.random.default_rng(bits * 1000 + gs + T)
    R, DR = 2 * gs if gs < 128 else 256, gs
    c = make_case(rng, B, H, T, R, DR, bits, gs, spread=0.3)
    scale = 0.11
    y = run(c, scale, bits, gs)
    assert y.shape == (B, H, R) and y.dtype == mx.float32
    ref = mla_decode_reference(*c, scale, gs, bits)
    assert rel_err(np.array(y), ref) < 2e-5


def test_kimi_layout_long(cpu_path):
    """64 heads, latent 512 + rope 64, 5000 positions (19 chunks), peaked scores."""
    rng = np.random.default_rng(3)
    c = make_case(rng, 1, 64, 5000, 512, 64, 8, 64, sdtype=mx.bfloat16, spread=0.5)
    y = run(c, 0.1, 8, 64)
    assert rel_err(np.array(y), mla_decode_reference(*c, 0.1, 64, 8)) < 2e-5


@pytest.mark.parametrize(
    "qdtype,sdtype,tol",
    [(mx.bfloat16, mx.bfloat16, 1e-2), (mx.float16, mx.float16, 2e-3), (mx.float32, mx.float16, 2e-5)],
)
def test_dtypes(qdtype, sdtype, tol):
    rng = np.random.default_rng(5)
    c = make_case(rng, 1, 6, 300, 128, 64, 4, 64, qdtype, sdtype, spread=0.3)
    y = run(c, 0.2, 4, 64)
    assert y.dtype == qdtype
    assert rel_err(np.array(y.astype(mx.float32)), mla_decode_reference(*c, 0.2, 64, 4)) < tol


def test_stable_softmax_large_scores():
    """Scores in the thousands: a naive exp overflows; the online softmax does not."""
    rng = np.random.default_rng(9)
    c = make_case(rng, 1, 4, 700, 128, 64, 8, 64, spread=30.0)
    y = np.array(run(c, 1.0, 8, 64))
    assert np.isfinite(y).all()
    assert rel_err(y, mla_decode_reference(*c, 1.0, 64, 8)) < 1e-4


def test_thread_count_does_not_change_result():
    rng = np.random.default_rng(4)
    c = make_case(rng, 2, 7, 3000, 128, 64, 4, 32)
    n = moequant.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            moequant.set_num_threads(t)
            outs.append(np.array(run(c, 0.3, 4, 32)))
    finally:
        moequant.set_num_threads(n)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_nan_query_gives_nan_not_garbage():
    rng = np.random.default_rng(1)
    q_lat, q_pe, lat, pe = make_case(rng, 1, 2, 40, 64, 64, 8, 64)
    q_lat = mx.concatenate([mx.full((1, 1, 64), float("nan")), q_lat[:, 1:]], axis=1)
    y = np.array(run((q_lat, q_pe, lat, pe), 0.2, 8, 64))
    assert np.isnan(y[0, 0]).all() and np.isfinite(y[0, 1]).all()


def test_head_axis_of_the_cache_is_accepted():
    """The cache's own (B, 1, T, ...) layout, sliced to its offset (a strided view)."""
    rng = np.random.default_rng(2)
    q_lat, q_pe, lat, pe = make_case(rng, 2, 3, 50, 64, 64, 8, 64)
    lat4 = tuple(mx.concatenate([a, a], axis=1)[:, None, :50] for a in lat)
    pe4 = tuple(mx.concatenate([a, a], axis=1)[:, None, :50] for a in pe)
    y = moequant.mla_decode_attention(q_lat, q_pe, lat4, pe4, scale=0.2, bits=8, group_size=64)
    assert rel_err(np.array(y), mla_decode_reference(q_lat, q_pe, lat, pe, 0.2, 64, 8)) < 2e-5


@pytest.mark.parametrize(
    "change,msg",
    [
        (dict(bits=3), "bits must be 4 or 8"),
        (dict(group_size=16), "group_size must be 32, 64 or 128"),
        (dict(q_pe=mx.zeros((1, 3, 64))), "q_pe must have shape"),
        (dict(lat_T=0), "the cache is empty"),
        (dict(pe_s_dtype=mx.float16), "one dtype"),
        (dict(R=96, gs=64), "must both be multiples of group_size"),
        (dict(bits="8"), "bits must be an int"),
    ],
)
def test_bad_arguments(change, msg):
    R, gs = change.get("R", 64), change.get("gs", 64)
    q_lat = mx.zeros((1, 2, R))
    q_pe = change.get("q_pe", mx.zeros((1, 2, 64)))
    T = change.get("lat_T", 5)
    lat = tuple(
        mx.zeros((1, T, n), d)
        for n, d in ((R // 4, mx.uint32), (R // 64 or 1, mx.float32), (R // 64 or 1, mx.float32))
    )
    pe = (
        mx.zeros((1, 5, 16), mx.uint32),
        mx.zeros((1, 5, 1), change.get("pe_s_dtype", mx.float32)),
        mx.zeros((1, 5, 1)),
    )
    with pytest.raises(ValueError, match=msg):
        moequant.mla_decode_attention(
            q_lat,
            q_pe,
            lat,
            pe,
            scale=1.0,
            bits=change.get("bits", 8),
            group_size=change.get("group_size", gs),
        )
