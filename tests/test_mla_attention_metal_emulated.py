"""The Metal kernels of mla_decode_attention (metal/mla_attention.metal) on the CPU
emulation of MSL (tests/metal_emulator), against the same float64 oracle as the CPU
op, plus the device bytes the launches read. Two ways in: the op's own host dispatch
(MlaDecodePartial/MlaDecodeMerge::encode, what eval_gpu runs on a Mac, recorded by
_metal_dispatch_plan) for every instantiation, and direct launches with small chunks
(ragged chunks and blocks at sizes the emulator runs fast)."""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mla_reference import make_case, mla_decode_reference, rel_err

metal_emulator = pytest.importorskip(
    "metal_emulator", reason="the metal_emulator test package (tests/metal_emulator) is not importable"
)

from metal_emulator.dispatch import metal_plan, result, run_plan  # noqa: E402

METAL = Path(__file__).resolve().parents[1] / "metal" / "mla_attention.metal"
LAUNCH = (METAL.parent / "mla_attention_launch.h").read_text()


def launch_constant(name: str) -> int:
    return int(re.search(rf"#define {name} (\d+)", LAUNCH).group(1))


SG, TB = launch_constant("MQ_MLA_SG"), launch_constant("MQ_MLA_TB")
MIN_CHUNK = launch_constant("MQ_MLA_MIN_CHUNK")
NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
_LIBS = {}


def lib_for(name):
    if name not in _LIBS:
        _LIBS[name] = metal_emulator.MetalLibrary(str(METAL), only=[name])
    return _LIBS[name]


def host(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.ascontiguousarray(np.array(a))


def run_metal(q_lat, q_pe, lat, pe, scale, bits, gs, chunk, schedule="forward", **kw):
    B, H, R = q_lat.shape
    DR, T = q_pe.shape[2], lat[0].shape[1]
    nc = -(-T // chunk)
    qn, sn = NAMES[q_lat.dtype], NAMES[lat[1].dtype]
    ml = np.full((B, nc, H, 2), np.nan, np.float32)
    acc = np.full((B, nc, H, R), np.nan, np.float32)
    bufs = {0: host(q_lat), 1: host(q_pe)}
    for i, a in enumerate((*lat, *pe)):
        bufs[2 + i] = host(a)
    bufs.update(
        {
            8: ml,
            9: acc,
            10: np.uint32(H),
            11: np.uint32(T),
            12: np.uint32(R),
            13: np.uint32(DR),
            14: np.uint32(gs),
            15: np.uint32(chunk),
            16: np.float32(scale),
        }
    )
    name = f"mla_decode_partial_{qn}_{sn}_b{bits}"
    ra = lib_for(name).run(
        name, buffers=bufs, grid=(nc, -(-H // SG), B), threadgroup=(32, SG, 1), schedule=schedule, **kw
    )
    odt = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[qn]
    out = np.zeros((B, H, R), odt)
    name = f"mla_decode_merge_{qn}"
    rb = lib_for(name).run(
        name,
        buffers={0: ml, 1: acc, 2: out, 3: np.uint32(H), 4: np.uint32(R), 5: np.uint32(nc)},
        grid=(H, B, 1),
        threadgroup=(32, 1, 1),
        schedule=schedule,
        **kw,
    )
    y = mx.array(out).view(mx.bfloat16) if qn == "bfloat16" else mx.array(out)
    return np.array(y.astype(mx.float32)), ra, rb


def case(rng, B, H, T, R, DR, bits, gs, qdtype=mx.float32, sdtype=mx.float32):
    return make_case(rng, B, H, T, R, DR, bits, gs, qdtype, sdtype, spread=0.3)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs,R,DR", [(32, 96, 32), (64, 128, 64), (128, 256, 128)])
def test_against_float64(bits, gs, R, DR):
    """Ragged chunks and blocks (T 45, chunks of 16), 6 heads (a partly idle simdgroup),
    two batch rows, two schedules."""
    rng = np.random.default_rng(bits + gs)
    c = case(rng, 2, 6, 45, R, DR, bits, gs)
    ref = mla_decode_reference(*c, 0.15, gs, bits)
    for schedule in ("forward", "reverse"):
        y, _, _ = run_metal(*c, 0.15, bits, gs, chunk=16, schedule=schedule)
        assert rel_err(y, ref) < 2e-5, schedule


@pytest.mark.parametrize(
    "qdtype,sdtype,tol",
    [(mx.bfloat16, mx.bfloat16, 1e-2), (mx.float16, mx.float16, 2e-3), (mx.float32, mx.bfloat16, 2e-5)],
)
def test_dtypes(qdtype, sdtype, tol):
    rng = np.random.default_rng(11)
    c = case(rng, 1, 4, 20, 64, 64, 8, 64, qdtype, sdtype)
    y, _, _ = run_metal(*c, 0.2, 8, 64, chunk=8, schedule="random")
    assert rel_err(y, mla_decode_reference(*c, 0.2, 64, 8)) < tol


def test_kimi_layout_and_bytes():
    """64 heads, latent 512 + rope 64, 8-bit g64 bf16, 40 positions in 2 chunks. Each
    threadgroup (4 heads) reads its chunk's packed words, scales and biases once."""
    rng = np.random.default_rng(2)
    T, H, R, DR = 40, 64, 512, 64
    c = case(rng, 1, H, T, R, DR, 8, 64, mx.bfloat16, mx.bfloat16)
    y, ra, rb = run_metal(*c, 0.1, 8, 64, chunk=24, count_unique=True)
    assert rel_err(y, mla_decode_reference(*c, 0.1, 64, 8)) < 1e-2
    cache_bytes = sum(int(a.nbytes) for a in (*c[2], *c[3]))
    q_bytes = int(c[0].nbytes + c[1].nbytes)
    # Each head group reads every packed word once and a scale and a bias per word (one
    # per 4 codes: the 64-code groups are re-read 16 times, from cache on a GPU); each
    # of the 2 chunks reads its heads' queries once.
    words = (R + DR) * 8 // 32
    per_group = T * words * 4 + T * words * 2 * 2
    assert ra.unique_bytes_read == cache_bytes + q_bytes
    assert ra.bytes_read == (H // SG) * per_group + 2 * q_bytes
    print(
        f"\npartial: {ra.bytes_read / 1e6:.2f} MB loaded ({H // SG} head groups x the cache "
        f"{cache_bytes / 1e3:.1f} KB, scales per word), {ra.unique_bytes_read / 1e3:.1f} KB distinct"
    )


# ---- the host dispatch (what eval_gpu encodes on a Mac) ----------------------------------
def run_host_dispatch(q_lat, q_pe, lat, pe, scale, bits, gs, schedule="forward", **kw):
    """mla_decode_attention's Metal form built by the op's host code (on the CPU stream:
    its primitives are only encoded, never evaluated here), its recorded launches run on
    the emulator. Returns y (float32 numpy), the plan and the launch results."""
    import moequant

    y = moequant._ext._mla_decode_attention_metal_graph(
        q_lat, q_pe, *lat, *pe, scale=scale, bits=bits, group_size=gs, stream=mx.cpu
    )
    plan = metal_plan([y])
    bufs, res = run_plan(plan, lib_for, schedule=schedule, **kw)
    out = result(plan, bufs, 0, y)
    assert out.dtype == q_lat.dtype and out.shape == q_lat.shape
    return np.array(out.astype(mx.float32)), plan, res


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gs,R,DR", [(32, 96, 32), (64, 128, 64), (128, 256, 128)])
def test_host_dispatch_against_float64(bits, gs, R, DR):
    """T = MIN_CHUNK + 37: two chunks, the second ragged (and a ragged block); 6 heads (a
    partly idle simdgroup); two batch rows."""
    rng = np.random.default_rng(3 * bits + gs)
    T = MIN_CHUNK + 37
    c = case(rng, 2, 6, T, R, DR, bits, gs)
    y, plan, _ = run_host_dispatch(*c, 0.15, bits, gs, schedule="reverse")
    assert [la["kernel"] for la in plan["launches"]] == [
        f"mla_decode_partial_float32_float32_b{bits}",
        "mla_decode_merge_float32",
    ]
    assert plan["launches"][0]["grid"] == (2, 2, 2)
    assert plan["launches"][1]["grid"] == (6, 2, 1)
    assert rel_err(y, mla_decode_reference(*c, 0.15, gs, bits)) < 2e-5


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "qdtype,sdtype,tol",
    [
        (mx.float32, mx.float32, 2e-5),
        (mx.float32, mx.float16, 2e-5),
        (mx.float32, mx.bfloat16, 2e-5),
        (mx.float16, mx.float32, 2e-3),
        (mx.float16, mx.float16, 2e-3),
        (mx.float16, mx.bfloat16, 2e-3),
        (mx.bfloat16, mx.float32, 1e-2),
        (mx.bfloat16, mx.float16, 1e-2),
        (mx.bfloat16, mx.bfloat16, 1e-2),
    ],
)
def test_host_dispatch_every_instantiation(bits, qdtype, sdtype, tol):
    """Every kernel the host can name (q dtype x scales dtype x bits, and the merge per
    output dtype) runs and matches the oracle; the CPU op agrees."""
    import moequant

    rng = np.random.default_rng(bits * 5 + len(NAMES[qdtype]) + 7 * len(NAMES[sdtype]))
    c = case(rng, 1, 4, 20, 64, 64, bits, 64, qdtype, sdtype)
    y, plan, _ = run_host_dispatch(*c, 0.2, bits, 64, schedule="random")
    assert plan["launches"][0]["kernel"] == f"mla_decode_partial_{NAMES[qdtype]}_{NAMES[sdtype]}_b{bits}"
    assert plan["launches"][1]["kernel"] == f"mla_decode_merge_{NAMES[qdtype]}"
    ref = mla_decode_reference(*c, 0.2, 64, bits)
    assert rel_err(y, ref) < tol
    cpu = moequant.mla_decode_attention(*c, scale=0.2, bits=bits, group_size=64, stream=mx.cpu)
    assert rel_err(y, np.array(cpu.astype(mx.float32))) < 2 * tol


def test_host_dispatch_kimi_layout():
    """64 heads, latent 512 + rope 64 (the kernel's register limits), bf16, 8-bit g64, B=1."""
    rng = np.random.default_rng(5)
    c = case(rng, 1, 64, 24, 512, 64, 8, 64, mx.bfloat16, mx.bfloat16)
    y, plan, _ = run_host_dispatch(*c, 0.1, 8, 64)
    assert plan["launches"][0]["grid"] == (1, 64 // SG, 1)
    assert plan["launches"][0]["threadgroup"] == (32, SG, 1)
    assert rel_err(y, mla_decode_reference(*c, 0.1, 64, 8)) < 1e-2


def test_host_dispatch_chunk_policy():
    """Chunks of at least MIN_CHUNK positions, a multiple of TB, at most
    MQ_MLA_MAX_CHUNKS per row: the partial buffers stay bounded at long contexts."""
    import moequant

    max_chunks = launch_constant("MQ_MLA_MAX_CHUNKS")
    # (T, chunks): None where only the bound is checked (longer chunks, rounded to TB).
    for T, want in (
        (1, 1),
        (MIN_CHUNK, 1),
        (MIN_CHUNK + 1, 2),
        (MIN_CHUNK * max_chunks, max_chunks),
        (MIN_CHUNK * max_chunks + 1, None),
        (131072 * 2, max_chunks),
    ):
        lat = (mx.zeros((1, T, 8), mx.uint32), mx.zeros((1, T, 1)), mx.zeros((1, T, 1)))
        pe = (mx.zeros((1, T, 8), mx.uint32), mx.zeros((1, T, 1)), mx.zeros((1, T, 1)))
        y = moequant._ext._mla_decode_attention_metal_graph(
            mx.zeros((1, 2, 32)),
            mx.zeros((1, 2, 32)),
            *lat,
            *pe,
            scale=1.0,
            bits=8,
            group_size=32,
            stream=mx.cpu,
        )
        plan = metal_plan([y])
        grid, consts = plan["launches"][0]["grid"], plan["launches"][0]["buffers"]
        chunk = int(np.frombuffer(consts[launch_constant("MQ_MLA_CHUNK")][1], np.uint32)[0])
        assert grid[0] == (want or grid[0]) <= max_chunks, T
        assert chunk % TB == 0 and chunk >= MIN_CHUNK, T
        assert (grid[0] - 1) * chunk < T <= grid[0] * chunk, T


def test_metal_form_refuses_what_the_kernel_cannot_hold():
    """R > 512 (the per-lane query registers) is refused naming the limit, before any
    launch; the CPU form takes it."""
    import moequant

    rng = np.random.default_rng(8)
    c = case(rng, 1, 2, 5, 640, 64, 8, 64)
    with pytest.raises(
        ValueError,
        match=r"the Metal kernel takes a latent dimension up to "
        r"512, a rope dimension up to 128 and 640 in all; got 640 and 64",
    ):
        moequant._ext._mla_decode_attention_metal_graph(
            *c[:2], *c[2], *c[3], scale=1.0, bits=8, group_size=64, stream=mx.cpu
        )
    y = moequant.mla_decode_attention(*c, scale=0.1, bits=8, group_size=64, stream=mx.cpu)
    assert rel_err(np.array(y), mla_decode_reference(*c, 0.1, 64, 8)) < 2e-5


def test_metal_form_is_not_evaluated_on_the_cpu():
    import moequant

    c = case(np.random.default_rng(9), 1, 2, 5, 64, 64, 8, 64)
    y = moequant._ext._mla_decode_attention_metal_graph(
        *c[:2], *c[2], *c[3], scale=1.0, bits=8, group_size=64, stream=mx.cpu
    )
    with pytest.raises(RuntimeError, match="the Metal form runs on GPU streams only"):
        mx.eval(y)
