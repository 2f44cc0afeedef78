"""mla_decode_core (one decode step of MLA's absorbed attention over a float cache, embed_q
to unembed_out, one CPU primitive) against the op-by-op chain it replaces (bit for bit:
mla_attention.attend's decode form on quantized_multi_linear) and a float64 oracle."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moe_reference import MX_DTYPES, dequantize64, make_proj
from moequant import mla_attention, ops

# Relative to max |ref|, as tests/test_quantized_multi_linear.py (the output is rounded
# to the query's dtype).
TOL = {"float32": 5e-5, "bfloat16": 1e-2}


def make(rng, B, H, S, R, dn, dr, dv, bits, gs, dtype="float32", obits=None, ogs=None):
    """Queries, a cache and the two up-projections (quantized by mx.quantize)."""
    f = lambda *sh: mx.array(rng.standard_normal(sh).astype(np.float32)).astype(MX_DTYPES[dtype])
    eq = make_proj(rng, H, R, dn, bits, gs, dtype, std=0.3)
    uo = make_proj(rng, H, dv, R, obits or bits, ogs or gs, dtype, std=0.1)
    return f(B, H, dn), f(B, H, dr), f(B, S, R), f(B, S, dr), eq, uo


def core(c, scale, **kw):
    qn, qp, lat, kp, eq, uo = c
    return moequant.mla_decode_core(
        qn, qp, lat, kp, eq[:3], uo[:3], scale=scale, bits=(eq[3], uo[3]), group_size=(eq[4], uo[4]), **kw
    )


def chain(c, scale):
    """Today's chain: attend()'s decode form with the layer's quantized up-projections,
    in the model's dtype after (as _FusedMLA's call)."""
    qn, qp, lat, kp, eq, uo = c
    B, H = qn.shape[:2]
    fns = [
        lambda x, p=p: moequant.quantized_multi_linear(
            x.astype(mx.float32), *p[:3], bits=p[3], group_size=p[4]
        )
        for p in (eq, uo)
    ]
    dv = uo[0].shape[1]
    wv = mx.zeros((H, dv, lat.shape[-1]))  # only its shape is read
    # The absorbed form whatever the multiply-adds say (at S = 1 attend() picks the
    # expanded one: _FusedMLA keeps it there).
    cost = mla_attention._absorbed_cost
    mla_attention._absorbed_cost = lambda *a: 0
    try:
        out = mla_attention.attend(
            qn[:, :, None], qp[:, :, None], lat[:, None], kp[:, None], None, wv, scale, None, fns
        )
    finally:
        mla_attention._absorbed_cost = cost
    return out.astype(qn.dtype).reshape(B, H, dv)


def reference(c, scale):
    qn, qp, lat, kp, eq, uo = c
    f64 = lambda a: np.array(a.astype(mx.float32)).astype(np.float64)
    wq, wo = dequantize64(*eq[:3], eq[3], eq[4]), dequantize64(*uo[:3], uo[3], uo[4])
    ql = np.einsum("bhd,hrd->bhr", f64(qn), wq)
    L = f64(lat)
    s = scale * (np.einsum("bhr,bsr->bhs", ql, L) + np.einsum("bhd,bsd->bhs", f64(qp), f64(kp)))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhr,hvr->bhv", np.einsum("bhs,bsr->bhr", p, L), wo)


def check(c, scale, dtype):
    y = core(c, scale)
    want = chain(c, scale)
    assert y.shape == want.shape and y.dtype == want.dtype
    assert mx.array_equal(y, want).item()
    ref = reference(c, scale)
    err = float(np.abs(np.array(y.astype(mx.float32)) - ref).max() / max(np.abs(ref).max(), 1e-30))
    assert err < TOL[dtype], err
    return y


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("gs", (32, 64, 128))
def test_bits_groups_same_bits_as_chain(bits, gs, cpu_path):
    rng = np.random.default_rng(bits * 100 + gs)
    # R and dn end on an odd number of groups; H and S not multiples of any block.
    check(make(rng, 1, 5, 7, 2 * 128 + gs, 128 + gs, 16, 24, bits, gs), 0.2, "float32")
    check(make(rng, 2, 3, 1, 128 + gs, gs, 8, 40, bits, gs, "bfloat16"), 0.3, "bfloat16")


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("S", (1, 2, 33))
def test_kimi_head_shape(dtype, S, cpu_path):
    """Kimi's head: R 512, dn 128, dr 64, dv 128 at 6 bits g64 (4 of its 64 heads)."""
    rng = np.random.default_rng(S)
    check(make(rng, 1, 4, S, 512, 128, 64, 128, 6, 64, dtype), 0.07, dtype)


def test_mixed_up_projection_formats():
    """embed_q and unembed_out quantized differently (bits and group size)."""
    rng = np.random.default_rng(9)
    check(make(rng, 2, 3, 11, 256, 64, 16, 32, 4, 32, "float32", obits=8, ogs=128), 0.25, "float32")


def test_strided_views_as_the_cache_returns_them():
    """The cache's (B, 1, S, d) slices of a larger buffer, a (B, H, 1, d) query sliced
    from a wider one and a latent with a non-unit last stride: the same bits as
    contiguous copies, and no Contiguous node in front of the primitive."""
    rng = np.random.default_rng(2)
    B, H, S, R, dn, dr, dv = 2, 3, 6, 128, 64, 16, 32
    c = make(rng, B, H, S, R, dn, dr, dv, 6, 64, "bfloat16")
    qn, qp, lat, kp, eq, uo = c
    buf = mx.zeros((B, 1, S + 10, R + dr), mx.bfloat16)
    buf[:, 0, :S, :R] = lat
    buf[:, 0, :S, R:] = kp
    q = mx.concatenate([qn, qp], axis=-1)[:, :, None]  # (B, H, 1, dn + dr)
    lat_t = mx.array(np.array(lat.astype(mx.float32)).transpose(0, 2, 1)).astype(mx.bfloat16).swapaxes(1, 2)
    mx.eval(buf, q, lat_t)
    views = (q[..., :dn], q[..., dn:], buf[:, :, :S, :R], buf[:, :, :S, R:], eq, uo)
    want = core(c, 0.3)
    got = core(views, 0.3)
    assert got.shape == (B, H, dv)
    assert mx.array_equal(got, want).item()
    assert mx.array_equal(core((qn, qp, lat_t, kp, eq, uo), 0.3), want).item()


def test_strided_views_add_no_nodes(tmp_path):
    """The cache's views (unevaluated slices) and the sliced query go in as they are:
    the op is one node on top of their producers (no Contiguous, Reshape or AsType)."""
    rng = np.random.default_rng(3)
    qn, qp, lat, kp, eq, uo = make(rng, 1, 2, 4, 64, 32, 8, 16, 4, 32, "bfloat16")
    mx.eval(qn, qp, lat, kp)
    q = mx.concatenate([qn, qp], axis=-1)[:, :, None]
    kv = mx.concatenate([lat, kp], axis=-1)[:, None]
    views = (q[..., :32], q[..., 32:], kv[..., :64], kv[..., 64:], eq, uo)
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), core(views, 0.5))
    prims = re.findall(r'label ="(\w+)", shape=rectangle', dot.read_text())
    assert (
        sorted(prims) == ["Concatenate"] * 2 + ["ExpandDims"] * 2 + ["MoequantMlaDecodeCore"] + ["Slice"] * 4
    ), prims


def test_thread_count_does_not_change_result():
    rng = np.random.default_rng(4)
    c = make(rng, 2, 8, 300, 256, 64, 32, 64, 6, 64)
    n = moequant.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            moequant.set_num_threads(t)
            outs.append(np.array(core(c, 0.1)))
    finally:
        moequant.set_num_threads(n)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_gpu_form_on_the_cpu(dtype):
    """The graph a GPU stream gets (MLX's ops), evaluated on the CPU, against float64."""
    rng = np.random.default_rng(6)
    c = make(rng, 2, 3, 9, 128, 64, 16, 32, 4, 64, dtype)
    qn, qp, lat, kp, eq, uo = c
    y = ops._mla_decode_core_mlx_graph(
        qn, qp, lat[:, None], kp[:, None], eq[:3], uo[:3], scale=0.3, bits=4, group_size=64, stream=mx.cpu
    )
    assert y.shape == (2, 3, 32) and y.dtype == qn.dtype
    ref = reference(c, 0.3)
    err = float(np.abs(np.array(y.astype(mx.float32)) - ref).max() / np.abs(ref).max())
    assert err < TOL[dtype], err


def _bad(name):
    rng = np.random.default_rng(0)
    qn, qp, lat, kp, eq, uo = make(rng, 1, 2, 3, 64, 32, 8, 16, 4, 32)
    a = dict(
        q_nope=qn, q_pe=qp, latent=lat, k_pe=kp, embed_q=eq[:3], unembed_out=uo[:3], bits=4, group_size=32
    )
    other = make_proj(rng, 3, 64, 32, 4, 32)
    change = {
        "rank": ("q_nope", mx.zeros((2, 32)), "q_nope must have shape"),
        "query4": ("q_pe", mx.zeros((1, 2, 2, 8)), "q_pe must have shape"),
        "cache rank": ("latent", mx.zeros((3, 64)), "latent must have shape"),
        "int dtype": ("q_nope", qn.astype(mx.int32), "q_nope and q_pe must be float"),
        "mixed q dtype": ("q_pe", qp.astype(mx.bfloat16), "one dtype"),
        "cache dtype": ("k_pe", kp.astype(mx.int8), "latent and k_pe must be float"),
        "H": ("embed_q", other[:3], "embed_q's weight must have shape (H=2"),
        "R": ("latent", mx.zeros((1, 3, 128)), "embed_q's weight must have shape (H=2, R=128"),
        "dr": ("k_pe", mx.zeros((1, 3, 16)), "k_pe's rope dimension"),
        "S": ("k_pe", mx.zeros((1, 4, 8)), "latent and k_pe must hold S positions"),
        "empty": ("latent", mx.zeros((1, 0, 64)), "latent and k_pe must hold"),
        "bits": ("bits", 7, "bits must be one of"),
        "bits pair": ("bits", (4, 7), "unembed_out: bits must be one of"),
        "group": ("group_size", 48, "group_size"),
        "not array": ("latent", np.zeros((1, 3, 64)), "latent must be an mx.array"),
        "triple": ("embed_q", eq[:2], "embed_q must be (weight, scales, biases)"),
        "bool bits": ("bits", True, "bits[0] must be an int"),
        "w dtype": ("unembed_out", (uo[0].astype(mx.int32), uo[1], uo[2]), "unembed_out: w must be uint32"),
    }[name]
    a[change[0]] = change[1]
    return a, change[2]


@pytest.mark.parametrize(
    "name",
    (
        "rank",
        "query4",
        "cache rank",
        "int dtype",
        "mixed q dtype",
        "cache dtype",
        "H",
        "R",
        "dr",
        "S",
        "empty",
        "bits",
        "bits pair",
        "group",
        "not array",
        "triple",
        "bool bits",
        "w dtype",
    ),
)
def test_bad_arguments(name):
    a, msg = _bad(name)
    args = [a.pop(k) for k in ("q_nope", "q_pe", "latent", "k_pe", "embed_q", "unembed_out")]
    with pytest.raises(ValueError, match=re.escape(msg)):
        mx.eval(moequant.mla_decode_core(*args, scale=1.0, **a))
