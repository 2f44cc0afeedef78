"""moe_prefill (CPU) against the float64 numpy oracle of moe_swiglu, on every CPU path."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moe_reference import MX_DTYPES, moe_reference, rel_err
from test_moe_swiglu import BITS, GROUPS, TOL, make_case

TOKENS = (5, 17, 64, 256)


@pytest.fixture
def threads():
    yield moequant.set_num_threads
    moequant.set_num_threads(0)


def routed_case(
    rng, E, D, I, k, T, bits=(4, 4, 4), gs=(64, 64, 64), sdtype="float32", xdtype="float32", skew=False
):
    """make_case with T tokens; skew routes most pairs to expert 0 (one large group,
    several small ones, as real routers do)."""
    x, idx, sc, g, u, d = make_case(rng, E, D, I, k, (T,), bits, gs, sdtype, xdtype)
    if skew:
        ids = np.array(idx)
        ids[: (3 * T) // 4, 0] = 0
        ids[: (3 * T) // 4, 1:] = (ids[: (3 * T) // 4, 1:] % (E - 1)) + 1
        idx = mx.array(ids)
    return x, idx, sc, g, u, d


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
def test_bits_groups(bits, gs, cpu_path):
    # D and I not multiples of the work tiles (96 rows) nor of the GEMM's blocks.
    T = TOKENS[(bits + gs // 32) % len(TOKENS)]
    rng = np.random.default_rng(bits * 1000 + gs)
    D, I = 128 + 3 * gs, 128 + 2 * gs
    case = routed_case(rng, 6, D, I, 3, T, (bits,) * 3, (gs,) * 3)
    y = moequant.moe_prefill(*case)
    assert y.shape == (T, D) and y.dtype == mx.float32
    assert rel_err(y, moe_reference(*case)) < TOL["float32"]


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("k", [1, 2, 8])
def test_tokens_topk(T, k, cpu_path):
    rng = np.random.default_rng(T * 10 + k)
    case = routed_case(rng, 8, 256, 192, k, T, (3, 3, 4), (64, 64, 64), skew=k > 1)
    assert rel_err(moequant.moe_prefill(*case), moe_reference(*case)) < TOL["float32"]


@pytest.mark.parametrize(
    "bits,gs", [((3, 3, 4), (64, 64, 64)), ((2, 5, 8), (32, 128, 64)), ((6, 4, 3), (128, 32, 32))]
)
def test_mixed_projections(bits, gs, cpu_path):
    rng = np.random.default_rng(7)
    case = routed_case(rng, 5, 512, 384, 4, 17, bits, gs)
    assert rel_err(moequant.moe_prefill(*case), moe_reference(*case)) < TOL["float32"]


@pytest.mark.parametrize("xdtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("sdtype", ["float32", "bfloat16", "float16"])
def test_dtypes(xdtype, sdtype, cpu_path):
    rng = np.random.default_rng(11)
    case = make_case(rng, 4, 256, 128, 2, (3, 7), (3, 3, 4), (64, 64, 64), sdtype, xdtype)
    y = moequant.moe_prefill(*case)
    assert y.dtype == MX_DTYPES[xdtype] and y.shape == (3, 7, 256)
    assert rel_err(y, moe_reference(*case)) < TOL[xdtype]


def test_matches_moe_swiglu():
    """The decode op and the prefill op compute the same function (float32 noise)."""
    rng = np.random.default_rng(21)
    case = routed_case(rng, 8, 384, 256, 4, 9, (3, 3, 4), (64, 64, 64), "bfloat16")
    a = np.array(moequant.moe_prefill(*case))
    b = np.array(moequant.moe_swiglu(*case))
    assert np.abs(a - b).max() <= 4e-6 * np.abs(b).max()


def test_thread_count_invariance(threads, cpu_path):
    """Bit-identical output for 1, 2, 3 and 5 threads (a skewed routing, so the work
    splits differ)."""
    rng = np.random.default_rng(8)
    case = routed_case(rng, 8, 320, 448, 4, 64, (3, 3, 4), (64, 64, 64), skew=True)
    outs = []
    for n in (1, 2, 3, 5):
        threads(n)
        outs.append(np.array(moequant.moe_prefill(*case)))
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_many_tokens_in_batches():
    """More tokens than one batch of the kernel (its pair buffers are capped at
    128 MiB each: 1024 tokens at width 4096 and k 8), and repeated experts."""
    rng = np.random.default_rng(12)
    T, k = 1030, 8
    case = routed_case(rng, 4, 4096, 64, 1, T, (4, 4, 4), (64, 64, 64))
    x, _, _, g, u, d = case
    idx = mx.array(rng.integers(0, 4, (T, k)).astype(np.int32))
    sc = mx.array(rng.random((T, k)).astype(np.float32))
    case = (x, idx, sc, g, u, d)
    assert rel_err(moequant.moe_prefill(*case), moe_reference(*case)) < TOL["float32"]


def test_kimi_shape():
    """Kimi-K2 dimensions (D 7168, I 2048, k 8) with three experts and 5 tokens."""
    rng = np.random.default_rng(5)
    x, _, _, g, u, d = make_case(rng, 3, 7168, 2048, 1, (5,), (3, 3, 4), (64, 64, 64), "bfloat16")
    idx = mx.array(rng.integers(0, 3, (5, 8)).astype(np.int32))
    sc = mx.array(rng.random((5, 8)).astype(np.float32))
    case = (x, idx, sc, g, u, d)
    assert rel_err(moequant.moe_prefill(*case), moe_reference(*case)) < TOL["float32"]


def test_nonfinite_activations():
    """inf or NaN in a token's x gives a non-finite output for that token only."""
    rng = np.random.default_rng(17)
    x, idx, sc, g, u, d = make_case(rng, 4, 256, 128, 2, (6,))
    xs = np.array(x)
    xs[0, 5] = np.inf
    xs[2, 200] = np.nan
    y = np.array(moequant.moe_prefill(mx.array(xs), idx, sc, g, u, d))
    assert not np.isfinite(y[0]).all()
    assert not np.isfinite(y[2]).all()
    assert np.isfinite(y[[1, 3, 4, 5]]).all()


def test_errors_and_empty():
    rng = np.random.default_rng(1)
    x, idx, sc, g, u, d = make_case(rng, 4, 128, 64, 2, (6,))
    with pytest.raises(ValueError, match="bits must be one of"):
        moequant.moe_prefill(x, idx, sc, (*g[:3], 7, 64), u, d)
    with pytest.raises(ValueError, match="leading shape of x"):
        moequant.moe_prefill(x[:1], idx, sc, g, u, d)
    with pytest.raises(ValueError, match="down: weight must have shape"):
        moequant.moe_prefill(x, idx, sc, g, u, g)
    y = moequant.moe_prefill(mx.zeros((0, 128)), mx.zeros((0, 2), mx.int32), mx.zeros((0, 2)), g, u, d)
    assert y.shape == (0, 128)
    mx.eval(y)
