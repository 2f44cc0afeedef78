"""The Metal kernels of moe_swiglu (metal/moe_swiglu.metal), run on the CPU emulation
of MSL (tests/metal_emulator) against the same float64 oracle as the CPU path, plus
the bytes each launch reads versus the minimum (each selected weight byte once)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moe_reference import make_proj, moe_reference, rel_err

metal_emulator = pytest.importorskip(
    "metal_emulator", reason="the metal_emulator test package (tests/metal_emulator) is not importable"
)

METAL = Path(__file__).resolve().parents[1] / "metal" / "moe_swiglu.metal"
from metal_emulator.dispatch import metal_plan, result, run_plan  # noqa: E402

NAMES = ("float32", "float16", "bfloat16")

_LIBS = {}


class Lib:
    """Compiles just the instantiations a test launches (the file has hundreds)."""

    def __call__(self, name):
        if name not in _LIBS:
            _LIBS[name] = metal_emulator.MetalLibrary(str(METAL), only=[name])
        return _LIBS[name]


@pytest.fixture(scope="module")
def lib():
    return Lib()


def proj_bytes(p, experts) -> int:
    w, s, b = p[:3]
    return sum(int(a[0].nbytes) for a in (w, s, b)) * len(experts)


def run_kernels(lib, x, idx, sc, g, u, d, schedule="forward", **kw):
    """moequant.moe_swiglu's Metal path on the emulator: the op builds its graph (on the
    CPU stream), its primitives' host dispatch (MoeGateUp/MoeDown::encode, what
    eval_gpu runs on a Mac) is recorded, and the recorded launches run on the emulator.
    Returns y (shaped like x) and the two launches' results."""
    import moequant

    y = moequant.moe_swiglu(x, idx, sc, g, u, d, stream=mx.cpu)
    plan = metal_plan([y])
    bufs, res = run_plan(plan, lib, schedule=schedule, **kw)
    assert [r["kernel"].split("_")[1] for r in plan["launches"]] == ["gate", "down"]
    return result(plan, bufs, 0, y), res[0], res[1]


def case(rng, E, D, I, k, T, bits, gs, sdtype="float32", xdtype=mx.float32):
    g = make_proj(rng, E, I, D, bits[0], gs[0], sdtype)
    u = make_proj(rng, E, I, D, bits[1], gs[1], sdtype)
    d = make_proj(rng, E, D, I, bits[2], gs[2], sdtype)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(xdtype)
    idx = mx.array(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32))
    sc = mx.array(rng.random((T, k)).astype(np.float32))
    return x, idx, sc, g, u, d


@pytest.mark.parametrize(
    "bits", [(2, 2, 2), (3, 3, 3), (4, 4, 4), (5, 5, 5), (6, 6, 6), (8, 8, 8), (3, 3, 4), (4, 6, 3)]
)
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_sweep(lib, bits, gs):
    rng = np.random.default_rng(sum(bits) * 100 + gs)
    # D and I are not multiples of a simdgroup step (1024 codes), so some lanes idle.
    c = case(rng, 5, 1024 + 128 * (1 + (gs == 128)), 192 if gs != 128 else 256, 3, 2, bits, (gs,) * 3)
    y, ra, rb = run_kernels(lib, *c, schedule="random")
    assert rel_err(y, moe_reference(*c)) < 2e-6


@pytest.mark.parametrize(
    "xdtype,sdtype,tol",
    [(mx.bfloat16, "bfloat16", 1e-2), (mx.float16, "float16", 2e-3), (mx.float32, "bfloat16", 2e-6)],
)
def test_dtypes(lib, xdtype, sdtype, tol):
    rng = np.random.default_rng(8)
    c = case(rng, 4, 512, 128, 2, 2, (3, 3, 4), (64, 64, 64), sdtype, xdtype)
    y, _, _ = run_kernels(lib, *c, schedule="reverse")
    assert rel_err(y, moe_reference(*c)) < tol


def test_kimi_shape_and_bytes(lib):
    """D 7168, I 2048, k 8 (three experts, repeated) and the bytes each launch reads."""
    rng = np.random.default_rng(5)
    x, _, _, g, u, d = case(rng, 3, 7168, 2048, 3, 1, (3, 3, 4), (64, 64, 64), "bfloat16", mx.bfloat16)
    idx = mx.array([[2, 0, 1, 1, 0, 2, 2, 1]])
    sc = mx.array(rng.random((1, 8)).astype(np.float32))
    y, ra, rb = run_kernels(lib, x, idx, sc, g, u, d, count_unique=True)
    assert rel_err(y, moe_reference(x, idx, sc, g, u, d)) < 1e-2
    pairs = list(np.array(idx)[0])
    min_a = proj_bytes(g, pairs) + proj_bytes(u, pairs)
    min_b = proj_bytes(d, pairs)
    # Beyond the weights (read once): every simdgroup re-reads its token's x (A) or
    # the k h vectors (B), each lane reads its 32-code chunk's scale and bias (shared
    # by G/32 lanes), and each thread the ids and scores. On a GPU these hit the cache.
    import moequant

    plan = metal_plan([moequant.moe_swiglu(x, idx, sc, g, u, d, stream=mx.cpu)])
    (ga, ta), (gb, tb) = ((la["grid"], la["threadgroup"]) for la in plan["launches"])
    SG = ta[1]  # simdgroups per threadgroup, as the host dispatch launches them
    D, I, k, G, xs, ss, tg_threads = 7168, 2048, 8, 64, 2, 2, ta[0] * ta[1]
    tgs_a, tgs_b = ga[0] * ga[1] * ga[2], gb[0] * gb[1] * gb[2]
    extra_a = tgs_a * (SG * D * xs + tg_threads * 4) + k * 2 * I * (D // 32 - D // G) * 2 * ss
    extra_b = tgs_b * (SG * k * I * 4 + tg_threads * k * 8) + k * D * (I // 32 - I // G) * 2 * ss
    print(
        f"\nkernel A: loads {ra.bytes_read / 1e6:.1f} MB, distinct {ra.unique_bytes_read / 1e6:.1f} MB"
        f" (8 pairs' weights {min_a / 1e6:.1f} MB); kernel B: loads {rb.bytes_read / 1e6:.1f} MB, distinct"
        f" {rb.unique_bytes_read / 1e6:.1f} MB (8 pairs' weights {min_b / 1e6:.1f} MB)"
    )
    # What a perfect cache fetches: each distinct expert's weights once (the ids repeat
    # here, 3 distinct), plus x, the ids and scores, and h.
    distinct = sorted(set(pairs))
    assert ra.unique_bytes_read <= proj_bytes(g, distinct) + proj_bytes(u, distinct) + 7168 * 2 + 8 * 4
    assert rb.unique_bytes_read <= proj_bytes(d, distinct) + 8 * 2048 * 4 + 8 * 8
    assert min_a <= ra.bytes_read <= min_a + extra_a
    assert min_b <= rb.bytes_read <= min_b + extra_b
    assert ra.bytes_written == 8 * 2048 * 4 and rb.bytes_written == 7168 * 2


class WholeFile:
    """The whole metal/moe_swiglu.metal compiled once (all host names), for the test
    that runs every instantiation."""

    def __init__(self):
        self.lib = metal_emulator.MetalLibrary(str(METAL))

    def __call__(self, name):
        return self.lib


TOL = {mx.float32: 2e-6, mx.float16: 2e-3, mx.bfloat16: 1e-2}
DT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def test_every_instantiation_runs():
    """Every host-named kernel of moe_swiglu.metal, launched by the host dispatch, on a
    small case against the float64 oracle, under two schedules: each gate/up pair of bits is paired with a down width
    that cycles through all of them, so every moe_down_* runs too."""
    lib = WholeFile()
    names = set(lib.lib.kernels)
    widths = (2, 3, 4, 5, 6, 8)
    ran = set()
    rng = np.random.default_rng(77)
    for xn in NAMES:
        for sn in NAMES:
            for i, bg in enumerate(widths):
                for j, bu in enumerate(widths):
                    bd = widths[(i + j) % len(widths)]
                    c = case(rng, 3, 256, 64, 2, 1, (bg, bu, bd), (64, 64, 64), sn, DT[xn])
                    for schedule in ("forward", "reverse"):
                        y, _, _ = run_kernels(lib, *c, schedule=schedule)
                        assert rel_err(y, moe_reference(*c)) < TOL[DT[xn]], (xn, sn, bg, bu, bd)
                    import moequant

                    plan = metal_plan([moequant.moe_swiglu(*c, stream=mx.cpu)])
                    ran |= {la["kernel"] for la in plan["launches"]}
    assert ran == names, sorted(names - ran)


def test_out_of_range_expert_ids(lib):
    """The documented behaviour (README, "Out-of-range expert ids"): never read out of
    bounds (the emulator checks every access), and the tokens with such an id get a NaN
    output row, while the other tokens are exact: the same rows as the CPU op's."""
    rng = np.random.default_rng(3)
    x, idx, sc, g, u, d = case(rng, 4, 256, 64, 2, 3, (4, 4, 4), (64, 64, 64))
    bad = np.array(idx)
    bad[1, 1] = 4  # == E
    bad[2, 0] = -1  # 0xFFFFFFFF once narrowed
    bad = mx.array(bad)
    y, _, _ = run_kernels(lib, x, bad, sc, g, u, d, schedule="random")
    y = np.array(y)
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
    want = moe_reference(x[:1], idx[:1], sc[:1], g, u, d)
    assert rel_err(mx.array(y[:1]), want) < 2e-6
    import moequant

    cpu = np.array(moequant.moe_swiglu(x, bad, sc, g, u, d, stream=mx.cpu))
    np.testing.assert_array_equal(np.isnan(cpu), np.isnan(y))
