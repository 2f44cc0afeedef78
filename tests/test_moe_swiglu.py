"""moe_swiglu (CPU) against a float64 numpy oracle built from the dequantized weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moe_reference import MX_DTYPES, make_proj, moe_reference, rel_err

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
# float32 activations: a few ulps of the output scale; bf16/f16: the output rounding.
TOL = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1e-2}


def make_case(rng, E, D, I, k, lead, bits=(4, 4, 4), gs=(64, 64, 64), sdtype="float32", xdtype="float32"):
    gate = make_proj(rng, E, I, D, bits[0], gs[0], sdtype)
    up = make_proj(rng, E, I, D, bits[1], gs[1], sdtype)
    down = make_proj(rng, E, D, I, bits[2], gs[2], sdtype)
    x = mx.array(rng.standard_normal((*lead, D)).astype(np.float32)).astype(MX_DTYPES[xdtype])
    n = int(np.prod(lead)) if lead else 1
    idx = np.stack([rng.choice(E, size=k, replace=False) for _ in range(n)])
    idx = mx.array(idx.reshape(*lead, k).astype(np.int32))
    scores = mx.array(rng.random((*lead, k)).astype(np.float32))
    return x, idx, scores, gate, up, down


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
def test_bits_groups(bits, gs, cpu_path):
    rng = np.random.default_rng(bits * 1000 + gs)
    # D = 3 * 128 + 2 * gs: not a multiple of every SIMD block width, so tails run too.
    D, I = 384 + 2 * gs, 256
    case = make_case(rng, 6, D, I, 3, (2,), (bits,) * 3, (gs,) * 3)
    y = moequant.moe_swiglu(*case)
    assert y.shape == (2, D) and y.dtype == mx.float32
    assert rel_err(y, moe_reference(*case)) < TOL["float32"]


@pytest.mark.parametrize(
    "bits,gs", [((3, 3, 4), (64, 64, 64)), ((2, 5, 8), (32, 128, 64)), ((6, 4, 3), (128, 32, 32))]
)
def test_mixed_projections(bits, gs, cpu_path):
    rng = np.random.default_rng(7)
    case = make_case(rng, 5, 512, 384, 4, (3,), bits, gs)
    assert rel_err(moequant.moe_swiglu(*case), moe_reference(*case)) < TOL["float32"]


@pytest.mark.parametrize("xdtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("sdtype", ["float32", "bfloat16", "float16"])
def test_dtypes(xdtype, sdtype, cpu_path):
    rng = np.random.default_rng(11)
    case = make_case(rng, 4, 256, 128, 2, (2, 2), (3, 3, 4), (64, 64, 64), sdtype, xdtype)
    y = moequant.moe_swiglu(*case)
    assert y.dtype == MX_DTYPES[xdtype] and y.shape == (2, 2, 256)
    assert rel_err(y, moe_reference(*case)) < TOL[xdtype]


@pytest.mark.parametrize("bits", [3, 6])
@pytest.mark.parametrize("gs", [32, 64])
def test_short_rows_one_level(bits, gs, cpu_path):
    """bf16 activations at 3 and 6 bits: rows of one, two and three load steps (the AVX2
    integer rows load a block together with 4 bytes of each neighbour, only between a
    row's first and last steps), every expert selected so the last row of each weight
    buffer is read (tests/test_sanitizers.py runs this file under AddressSanitizer)."""
    rng = np.random.default_rng(bits * 100 + gs)
    for D in (64, 128, 192):
        case = make_case(rng, 3, D, D, 3, (2,), (bits,) * 3, (gs,) * 3, "bfloat16", "bfloat16")
        assert rel_err(moequant.moe_swiglu(*case), moe_reference(*case)) < TOL["bfloat16"]


@pytest.mark.parametrize("lead,k", [((1,), 1), ((5,), 8), ((2, 3), 2), ((1, 1, 1), 4)])
def test_ragged_shapes(lead, k, cpu_path):
    """Odd token counts, k from 1 to all experts, I not a multiple of the row chunks."""
    rng = np.random.default_rng(3)
    case = make_case(rng, 8, 96, 160, k, lead, (4, 4, 6), (32, 32, 32))
    y = moequant.moe_swiglu(*case)
    assert y.shape == (*lead, 96)
    assert rel_err(y, moe_reference(*case)) < TOL["float32"]


@pytest.mark.parametrize("scale", [1e-15, 1e15, "outliers"])
def test_activation_magnitudes(scale, cpu_path):
    """Tiny, huge and outlier-heavy activations (the integer kernels scale x per group
    to a 24-bit fixed point, and the vector to a power of two: the error stays
    relative to the output's scale). Measured on every path: 0.6-2.4e-6, float and
    integer kernels alike; the bound leaves room for the seeds' spread."""
    rng = np.random.default_rng(13)
    x, idx, sc, g, u, d = make_case(rng, 4, 512, 256, 2, (3,), (3, 3, 4), (64, 64, 64))
    xs = np.array(x)
    if scale == "outliers":
        xs[:, ::97] *= 1e4  # one element of most groups 10^4 times the others
        # keep gate/up outputs moderate so SwiGLU stays in its interesting range
        xs *= 1e-2
    else:
        xs *= scale
    case = (mx.array(xs), idx, sc, g, u, d)
    with np.errstate(over="ignore"):  # exp(-g) of the reference's SiLU at 1e15
        ref = moe_reference(*case)
    assert rel_err(moequant.moe_swiglu(*case), ref) < 2 * TOL["float32"]


def test_nonfinite_activations(cpu_path):
    """inf or NaN in a token's x gives a non-finite output for that token only."""
    rng = np.random.default_rng(17)
    x, idx, sc, g, u, d = make_case(rng, 4, 256, 128, 2, (3,))
    xs = np.array(x)
    xs[0, 5] = np.inf
    xs[2, 200] = np.nan
    y = np.array(moequant.moe_swiglu(mx.array(xs), idx, sc, g, u, d))
    assert not np.isfinite(y[0]).all()
    assert not np.isfinite(y[2]).all()
    assert np.isfinite(y[1]).all()


def test_kimi_shape():
    """Kimi-K2 / DeepSeek-V3 dimensions: D 7168, I 2048, k 8. Three experts, chosen with
    repeats, keep the weights and the float64 oracle small."""
    rng = np.random.default_rng(5)
    x, _, sc, g, u, d = make_case(rng, 3, 7168, 2048, 3, (1,), (3, 3, 4), (64, 64, 64), "bfloat16")
    idx = mx.array([[2, 0, 1, 1, 0, 2, 2, 1]])
    sc = mx.array(rng.random((1, 8)).astype(np.float32))
    case = (x, idx, sc, g, u, d)
    assert rel_err(moequant.moe_swiglu(*case), moe_reference(*case)) < TOL["float32"]


def test_repeated_expert_and_zero_score():
    """The same expert twice in one token adds up; a zero score contributes nothing."""
    rng = np.random.default_rng(9)
    x, _, _, g, u, d = make_case(rng, 3, 128, 64, 2, (1,))
    one = moequant.moe_swiglu(x, mx.array([[1, 0]]), mx.array([[1.0, 0.0]]), g, u, d)
    two = moequant.moe_swiglu(x, mx.array([[1, 1]]), mx.array([[0.5, 0.5]]), g, u, d)
    np.testing.assert_allclose(np.array(one), np.array(two), rtol=1e-5, atol=1e-6)


def test_accepts_switch_linear_objects():
    """mlx-lm's QuantizedSwitchLinear is a valid projection argument."""
    from mlx_lm.models.switch_layers import SwitchGLU

    rng = np.random.default_rng(2)
    mlp = SwitchGLU(128, 64, 4)
    mlp.update(
        {
            n: {"weight": mx.array(rng.standard_normal((4, *m.weight.shape[1:])).astype(np.float32) * 0.1)}
            for n, m in (("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj), ("down_proj", mlp.down_proj))
        }
    )
    import mlx.nn as nn

    nn.quantize(mlp, group_size=32, bits=4)
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32))
    idx = mx.array([[0, 2], [1, 3], [3, 0]])
    sc = mx.array(rng.random((3, 2)).astype(np.float32))
    y = moequant.moe_swiglu(x, idx, sc, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    want = (mlp(x, idx) * sc[..., None]).sum(axis=-2)
    np.testing.assert_allclose(np.array(y), np.array(want), rtol=1e-4, atol=1e-5)


def test_inside_compile():
    rng = np.random.default_rng(4)
    x, idx, sc, g, u, d = make_case(rng, 4, 128, 64, 2, (2,))
    f = mx.compile(lambda x, i, s: moequant.moe_swiglu(x, i, s, g, u, d) * 2.0)
    np.testing.assert_allclose(
        np.array(f(x, idx, sc)),
        2.0 * np.array(moequant.moe_swiglu(x, idx, sc, g, u, d)),
        rtol=1e-6,
    )


def test_validation_errors():
    rng = np.random.default_rng(1)
    x, idx, sc, g, u, d = make_case(rng, 4, 128, 64, 2, (2,))
    with pytest.raises(ValueError, match="bits must be one of"):
        moequant.moe_swiglu(x, idx, sc, (*g[:3], 7, 64), u, d)
    with pytest.raises(ValueError, match="weight must have shape"):
        moequant.moe_swiglu(x, idx, sc, (*g[:3], 3, 64), u, d)
    with pytest.raises(ValueError, match="group_size must be"):
        moequant.moe_swiglu(x, idx, sc, (*g[:3], 4, 16), u, d)
    with pytest.raises(ValueError, match="leading shape of x"):
        moequant.moe_swiglu(x[:1], idx, sc, g, u, d)
    with pytest.raises(ValueError, match="shape of indices"):
        moequant.moe_swiglu(x, idx, sc[:, :1], g, u, d)
    with pytest.raises(ValueError, match="indices must be integer"):
        moequant.moe_swiglu(x, idx.astype(mx.float32), sc, g, u, d)
    with pytest.raises(ValueError, match="x must be float"):
        moequant.moe_swiglu(x.astype(mx.int32), idx, sc, g, u, d)
    with pytest.raises(ValueError, match="down: weight must have shape"):
        moequant.moe_swiglu(x, idx, sc, g, u, g)
    with pytest.raises(ValueError, match="expected \\(weight"):
        moequant.moe_swiglu(x, idx, sc, g[:3], u, d)


def assert_nan_rows(op, x, ids, sc, g, u, d, bad_tokens):
    """README "Out-of-range expert ids": the rows of the tokens with an id outside
    [0, E) are NaN, the others exact (against the oracle on those tokens), no error,
    and nothing out of range read (the sanitizer build checks that)."""
    y = np.array(op(x, ids, sc, g, u, d).astype(mx.float32)).reshape(-1, x.shape[-1])
    bad = np.zeros(y.shape[0], bool)
    bad[list(bad_tokens)] = True
    assert np.isnan(y[bad]).all(), "a token with an out-of-range id must give a NaN row"
    ok = np.flatnonzero(~bad)
    if not len(ok):
        return
    xs, idx, scs = (a.reshape(-1, a.shape[-1])[mx.array(ok)] for a in (x, ids, sc))
    want = moe_reference(xs, idx.astype(mx.int32), scs, g, u, d)
    assert np.isfinite(y[ok]).all() and rel_err(mx.array(y[ok]), want) < 2e-6


@pytest.mark.parametrize("op", ["moe_swiglu", "moe_prefill"])
def test_out_of_range_expert_ids_give_nan_rows(op, cpu_path):
    rng = np.random.default_rng(4)
    x, idx, sc, g, u, d = make_case(rng, 4, 128, 64, 2, (5,))
    ids = np.array(idx)
    ids[1, 1] = 4  # == E
    ids[3, 0] = -1  # 0xFFFFFFFF once narrowed
    ids[3, 1] = 7
    assert_nan_rows(getattr(moequant, op), x, mx.array(ids), sc, g, u, d, (1, 3))
    # Every token bad: all rows NaN; then an unrelated eval sees no late error.
    assert_nan_rows(getattr(moequant, op), x, idx + 4, sc, g, u, d, range(5))
    mx.eval(mx.ones((8,)) * 2)


def test_hidden_size_zero_refused_at_build(cpu_path):
    # D = 0 once divided by zero in the CPU down pass (SIGFPE, the process died).
    E, I = 4, 64
    w, s = mx.zeros((E, I, 0), mx.uint32), mx.zeros((E, I, 0))
    dw, ds = mx.zeros((E, 0, I * 4 // 32), mx.uint32), mx.zeros((E, 0, I // 64))
    with pytest.raises(ValueError, match=r"x \(2, 0\) has hidden size 0"):
        moequant.moe_swiglu(
            mx.zeros((2, 0)),
            mx.zeros((2, 2), mx.int32),
            mx.ones((2, 2)),
            (w, s, s, 4, 64),
            (w, s, s, 4, 64),
            (dw, ds, ds, 4, 64),
        )


def test_intermediate_size_zero_is_zero(cpu_path):
    # I = 0 is a well-defined (empty) sum: every path returns zeros.
    E, D = 4, 128
    w, s = mx.zeros((E, 0, D * 4 // 32), mx.uint32), mx.zeros((E, 0, D // 64))
    dw, ds = mx.zeros((E, D, 0), mx.uint32), mx.zeros((E, D, 0))
    y = moequant.moe_swiglu(
        mx.ones((2, D)),
        mx.zeros((2, 2), mx.int32),
        mx.ones((2, 2)),
        (w, s, s, 4, 64),
        (w, s, s, 4, 64),
        (dw, ds, ds, 4, 64),
    )
    assert y.shape == (2, D) and not np.any(np.array(y))


@pytest.mark.parametrize("dtype", [mx.int64, mx.uint64])
def test_64bit_expert_ids(dtype, cpu_path):
    rng = np.random.default_rng(2)
    x, idx, sc, g, u, d = make_case(rng, 4, 128, 64, 2, (2,))
    want = np.array(moequant.moe_swiglu(x, idx, sc, g, u, d))
    # In-range 64-bit ids are the same experts.
    np.testing.assert_array_equal(np.array(moequant.moe_swiglu(x, idx.astype(dtype), sc, g, u, d)), want)
    # 2^32 + e was narrowed to e and ran as expert e, silently: now out of range, so the
    # token's row is NaN (README "Out-of-range expert ids"), the other token exact.
    for bad in (2**32 + 1, 2**33, 2**63 - 1) + ((-1, -(2**32) + 1) if dtype == mx.int64 else ()):
        ids = np.array(idx).astype(np.int64 if dtype == mx.int64 else np.uint64)
        ids[0, 1] = bad
        assert_nan_rows(moequant.moe_swiglu, x, mx.array(ids), sc, g, u, d, (0,))
        # No error now or at the next, unrelated eval.
        for _ in range(3):
            mx.eval(mx.ones((8,)) * 2)


def test_token_count_overflow_refused_at_build():
    # 65536 * 65537 tokens overflow an int: refused by the op, before any int arithmetic
    # (UBSan flagged the signed overflow) and before reshape. Broadcasts: nothing allocated.
    rng = np.random.default_rng(3)
    _, _, _, g, u, d = make_case(rng, 4, 128, 64, 2, (1,))
    x = mx.broadcast_to(mx.zeros((1, 1, 128)), (65536, 65537, 128))
    ids = mx.broadcast_to(mx.zeros((1, 1, 2), mx.int32), (65536, 65537, 2))
    with pytest.raises(ValueError, match="more than 2\\^31 - 1 tokens"):
        moequant.moe_swiglu(x, ids, ids.astype(mx.float32), g, u, d)


def test_empty_batch():
    rng = np.random.default_rng(1)
    _, _, _, g, u, d = make_case(rng, 4, 128, 64, 2, (1,))
    y = moequant.moe_swiglu(mx.zeros((0, 128)), mx.zeros((0, 2), mx.int32), mx.zeros((0, 2)), g, u, d)
    assert y.shape == (0, 128)
    mx.eval(y)


@pytest.mark.parametrize("xdtype", ["float32", "bfloat16"])
def test_strided_inputs(xdtype, cpu_path):
    """x, the ids and the scores taken through their strides (a transpose, a slice of the
    last axis as mlx-lm's argpartition gives the ids, a step slice, a broadcast): the
    float64 reference, and array_equal with the same values passed contiguous, on 1 and
    2 threads."""
    rng = np.random.default_rng(21)
    E, D, I, k = 6, 256, 128, 3
    x, idx, sc, g, u, d = make_case(rng, E, D, I, k, (2, 3), xdtype=xdtype)
    views = {  # name: (x, ids, scores) views with the values of x, idx, sc
        "transpose": (
            mx.array(np.array(x.astype(mx.float32)).transpose(1, 0, 2)).astype(x.dtype).transpose(1, 0, 2),
            mx.array(np.array(idx).transpose(1, 0, 2)).transpose(1, 0, 2),
            mx.array(np.array(sc).transpose(1, 0, 2)).transpose(1, 0, 2),
        ),
        "last-axis slice": (
            mx.concatenate([x, x[..., :64]], axis=-1)[..., :D],
            mx.concatenate([idx, idx], axis=-1)[..., :k],
            mx.concatenate([sc, sc], axis=-1)[..., :k],
        ),
        "step slice": (
            mx.stack([x, x], axis=2).reshape(2, 6, D)[:, ::2],
            mx.stack([idx, idx], axis=2).reshape(2, 6, k)[:, ::2],
            mx.stack([sc, sc], axis=2).reshape(2, 6, k)[:, ::2],
        ),
    }
    want = np.array(moequant.moe_swiglu(x, idx, sc, g, u, d).astype(mx.float32))
    assert rel_err(mx.array(want), moe_reference(x, idx, sc, g, u, d)) < TOL[xdtype]
    saved = moequant.get_num_threads()
    try:
        for threads in (1, 2):
            moequant.set_num_threads(threads)
            for name, (xv, iv, sv) in views.items():
                mx.eval(xv, iv, sv)
                y = moequant.moe_swiglu(xv, iv, sv, g, u, d)
                assert y.shape == x.shape and y.dtype == x.dtype, name
                assert np.array_equal(np.array(y.astype(mx.float32)), want), (name, threads)
    finally:
        moequant.set_num_threads(saved)
    # A broadcast x (one row read for every token).
    xb = mx.broadcast_to(x[:1, :1], x.shape)
    yb = moequant.moe_swiglu(xb, idx, sc, g, u, d)
    xb_ref = mx.array(np.array(xb.astype(mx.float32))).astype(x.dtype)
    assert rel_err(yb, moe_reference(xb_ref, idx, sc, g, u, d)) < TOL[xdtype]


def test_strided_inputs_add_no_nodes(tmp_path):
    """On the CPU, x, the ids and the scores go in as they are (no Reshape / Contiguous
    nodes; uint32 ids and float32 scores need no AsType): two nodes on top of the
    producers, the output already in x's shape."""
    import re

    rng = np.random.default_rng(23)
    x, _, _, g, u, d = make_case(rng, 8, 128, 64, 2, (1, 1))
    a = x + x  # unevaluated
    logits = mx.array(rng.standard_normal((1, 1, 8)).astype(np.float32))
    ids = mx.argpartition(-logits, kth=1, axis=-1)[..., :2]  # uint32, a strided slice
    scores = mx.take_along_axis(logits, ids, axis=-1)
    y = moequant.moe_swiglu(a, ids, scores, g, u, d)
    assert y.shape == (1, 1, 128)
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), y)
    prims = re.findall(r'label ="(\w+)", shape=rectangle', dot.read_text())
    ours = [p for p in prims if p.startswith("Moe") or p in ("Reshape", "Contiguous", "AsType")]
    assert sorted(ours) == ["MoeDown", "MoeGateUp"], prims
    mx.eval(y)
    want = moe_reference(mx.array(np.array(a)), mx.array(np.array(ids)), mx.array(np.array(scores)), g, u, d)
    assert rel_err(y, want) < TOL["float32"]
