"""The Metal side of the ops that does not need a GPU: checks made when the graph is
built (the same on every backend), what a build without usable Metal kernels says,
and, on macOS with Metal, moe_swiglu on stream=mx.gpu against the CPU op and the
float64 oracle (skipped elsewhere, like the requantize GPU tests)."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

import moequant
from mla_reference import make_case, mla_decode_reference
from moe_reference import make_proj, moe_reference, rel_err

ON_METAL = sys.platform == "darwin" and mx.metal.is_available() and moequant.metal_available()


def small_case(
    rng,
    bits=(4, 4, 4),
    gs=(64, 64, 64),
    sdtypes=("float32",) * 3,
    xdtype=mx.float32,
    E=4,
    D=256,
    I=128,
    k=2,
    T=3,
):
    g = make_proj(rng, E, I, D, bits[0], gs[0], sdtypes[0])
    u = make_proj(rng, E, I, D, bits[1], gs[1], sdtypes[1])
    d = make_proj(rng, E, D, I, bits[2], gs[2], sdtypes[2])
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(xdtype)
    idx = mx.array(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32))
    sc = mx.array(rng.random((T, k)).astype(np.float32))
    return x, idx, sc, g, u, d


def test_gate_up_scales_dtype_refused_at_build():
    """One scales dtype for gate and up: refused when the graph is built, on every
    backend (it used to be accepted on the CPU and raised only at eval on Metal)."""
    x, idx, sc, g, u, d = small_case(np.random.default_rng(0), sdtypes=("float32", "bfloat16", "float32"))
    for op in (moequant.moe_swiglu, moequant.moe_prefill):
        with pytest.raises(
            ValueError, match="gate and up scales must share one dtype; got float32 and bfloat16"
        ):
            op(x, idx, sc, g, u, d, stream=mx.cpu)
    # down may differ: its kernel has its own scales type.
    x, idx, sc, g, u, d = small_case(np.random.default_rng(0), sdtypes=("bfloat16", "bfloat16", "float32"))
    assert (
        rel_err(moequant.moe_swiglu(x, idx, sc, g, u, d, stream=mx.cpu), moe_reference(x, idx, sc, g, u, d))
        < 1e-5
    )


@pytest.mark.skipif(moequant.metal_available(), reason="checks a build without Metal kernels")
def test_without_metal_gpu_calls_say_why():
    ok, reason = moequant.metal_status()
    assert not ok and reason and moequant.metal_available() is False
    assert moequant.has_metal is False
    x, idx, sc, g, u, d = small_case(np.random.default_rng(1))
    with pytest.raises(
        RuntimeError,
        match=r"\[moequant.moe_swiglu\] a GPU stream needs "
        r"moequant's Metal kernels, but .*Use stream=mx.cpu",
    ):
        moequant.moe_swiglu(x, idx, sc, g, u, d, stream=mx.gpu)
    assert reason in str(
        pytest.raises(
            RuntimeError,
            moequant.requantize_int4,
            mx.zeros((2, 8), mx.uint32),
            mx.ones((2, 2)),
            bits=4,
            stream=mx.gpu,
        ).value
    )
    with pytest.raises(ValueError, match=r"moe_prefill\] has no GPU kernel"):
        moequant.moe_prefill(x, idx, sc, g, u, d, stream=mx.gpu)
    q, qp, lat, pe = mla_case(np.random.default_rng(1))
    with pytest.raises(
        RuntimeError,
        match=r"\[moequant.mla_decode_attention\] a GPU stream "
        r"needs moequant's Metal kernels, but .*Use stream=mx.cpu",
    ):
        moequant.mla_decode_attention(q, qp, lat, pe, scale=0.1, bits=8, group_size=64, stream=mx.gpu)
    # Bad arguments are named first, as on every backend.
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        moequant.mla_decode_attention(q, qp, lat, pe, scale=0.1, bits=6, group_size=64, stream=mx.gpu)
    # The CPU ops are unaffected.
    assert (
        rel_err(moequant.moe_swiglu(x, idx, sc, g, u, d, stream=mx.cpu), moe_reference(x, idx, sc, g, u, d))
        < 2e-6
    )


def mla_case(rng, B=1, H=6, T=300, R=128, DR=64, bits=8, gs=64, qdtype=mx.float32, sdtype=mx.float32):
    return make_case(rng, B, H, T, R, DR, bits, gs, qdtype, sdtype, spread=0.3)


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux builds have no Metal backend")
def test_linux_build_reports_no_metal_backend():
    ok, reason = moequant.metal_status()
    assert not ok and "no Metal support" in reason and "macOS" in reason


# ---- the real Metal path (macOS) --------------------------------------------------------
GPU_BITS = [(2, 2, 2), (3, 3, 4), (4, 4, 4), (5, 6, 3), (6, 6, 6), (8, 8, 8)]


@pytest.mark.skipif(
    not ON_METAL,
    reason="needs macOS with a Metal GPU and moequant's "
    "metallib; on Linux the kernels run on the emulator (test_moe_metal_emulated)",
)
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("bits", GPU_BITS)
@pytest.mark.parametrize(
    "xdtype,sdtype,tol",
    [
        (mx.float32, "float32", 2e-6),
        (mx.bfloat16, "bfloat16", 1e-2),
        (mx.float16, "float16", 2e-3),
        (mx.float32, "bfloat16", 2e-6),
    ],
)
def test_moe_swiglu_gpu_matches_cpu_and_oracle(bits, gs, xdtype, sdtype, tol):
    rng = np.random.default_rng(sum(bits) * 7 + gs)
    c = small_case(
        rng,
        bits,
        (gs,) * 3,
        (sdtype,) * 3,
        xdtype,
        E=5,
        D=1024 + 2 * gs,
        I=2 * gs + 64 if gs < 128 else 256,
        k=3,
        T=2,
    )
    gpu = moequant.moe_swiglu(*c, stream=mx.gpu)
    cpu = moequant.moe_swiglu(*c, stream=mx.cpu)
    want = moe_reference(*c)
    assert gpu.dtype == xdtype and gpu.shape == c[0].shape
    assert rel_err(gpu, want) < tol
    assert rel_err(gpu, np.array(cpu.astype(mx.float32)).astype(np.float64)) < 2 * tol


@pytest.mark.skipif(not ON_METAL, reason="needs macOS with a Metal GPU and moequant's metallib")
def test_moe_swiglu_gpu_out_of_range_ids_give_nan_rows():
    x, idx, sc, g, u, d = small_case(np.random.default_rng(9))
    bad = np.array(idx)
    bad[1, 0] = 4
    y = np.array(moequant.moe_swiglu(x, mx.array(bad), sc, g, u, d, stream=mx.gpu))
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


@pytest.mark.skipif(
    not ON_METAL,
    reason="needs macOS with a Metal GPU and moequant's metallib; "
    "on Linux the kernels run on the emulator (test_mla_attention_metal_emulated)",
)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs,R,DR", [(32, 96, 32), (64, 512, 64), (128, 256, 128)])
@pytest.mark.parametrize(
    "qdtype,sdtype,tol",
    [
        (mx.float32, "float32", 2e-5),
        (mx.bfloat16, "bfloat16", 1e-2),
        (mx.float16, "float16", 2e-3),
        (mx.float32, "bfloat16", 2e-5),
    ],
)
def test_mla_decode_attention_gpu_matches_cpu_and_oracle(bits, gs, R, DR, qdtype, sdtype, tol):
    """T = 700: three chunks of the Metal form, the last ragged; two batch rows."""
    rng = np.random.default_rng(bits * 11 + gs)
    c = mla_case(
        rng, B=2, H=6, T=700, R=R, DR=DR, bits=bits, gs=gs, qdtype=qdtype, sdtype=getattr(mx, sdtype)
    )
    gpu = moequant.mla_decode_attention(*c, scale=0.1, bits=bits, group_size=gs, stream=mx.gpu)
    cpu = moequant.mla_decode_attention(*c, scale=0.1, bits=bits, group_size=gs, stream=mx.cpu)
    want = mla_decode_reference(*c, 0.1, gs, bits)
    assert gpu.dtype == qdtype and gpu.shape == c[0].shape
    assert rel_err(gpu.astype(mx.float32), want) < tol
    assert rel_err(gpu.astype(mx.float32), np.array(cpu.astype(mx.float32)).astype(np.float64)) < 2 * tol
