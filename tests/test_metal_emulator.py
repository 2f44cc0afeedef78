"""The Metal emulator itself: GPU semantics of the executor, error reporting, the lint,
strict mode, and mutated kernels that it must catch. Kernels under test live in
tests/metal_emulator/kernels/harness.metal."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from metal_emulator import (
    HERE,
    REPO_ROOT,
    MetalCompileError,
    MetalEmulatorError,
    MetalLibrary,
    MetalLintError,
    clang_available,
    lint_file,
)

HARNESS = HERE / "kernels" / "harness.metal"
SCHEDULES = ("forward", "reverse", "random")
# Prefixes of host names in metal/ and the test module that runs them on the emulator.
# A new kernel in metal/ fails test_every_metal_kernel_is_covered until it is added here.
COVERED = {
    "requantize_int4_": "tests/test_metal_requantize.py",
    "moe_gate_up_": "tests/test_moe_metal_emulated.py",
    "moe_down_": "tests/test_moe_metal_emulated.py",
    "mla_decode_": "tests/test_mla_attention_metal_emulated.py",
    "requantize_fit_int4_": "tests/test_metal_requantize_fit.py",
    "quantize_fit_": "tests/test_metal_requantize_fit.py",
}


@pytest.fixture(scope="module")
def lib():
    return MetalLibrary(HARNESS)


def harness_copy(tmp_path: Path, old: str, new: str) -> MetalLibrary:
    text = HARNESS.read_text()
    assert old in text, f"mutation target not found: {old!r}"
    p = tmp_path / "harness.metal"
    p.write_text(text.replace(old, new))
    return MetalLibrary(p, cache=tmp_path)


# ---- tg_sum: threadgroup memory, barrier, simd_sum ------------------------------------
def run_tg_sum(lib, dtype, schedule, n=1000, tg=256, seed=0):
    x = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    n_tg = (n + tg - 1) // tg
    out = np.zeros(n_tg, np.float32)
    lib.run(
        f"tg_sum_{'float' if dtype == np.float32 else 'half'}",
        {0: x, 1: out, 2: np.uint32(n)},
        grid=(n_tg, 1, 1),
        threadgroup=(tg, 1, 1),
        schedule=schedule,
        seed=seed,
    )
    want = np.array([x[i * tg : (i + 1) * tg].astype(np.float64).sum() for i in range(n_tg)])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tg_sum(lib, dtype, schedule):
    run_tg_sum(lib, dtype, schedule)


def test_tg_sum_ucontext_fallback():
    """The portable context switch (the one aarch64 Linux uses) gives the same results."""
    lib = MetalLibrary(HARNESS, context_switch="ucontext")
    for schedule in SCHEDULES:
        run_tg_sum(lib, np.float32, schedule, n=600)


def run_all_schedules(lib):
    for schedule in SCHEDULES:
        run_tg_sum(lib, np.float32, schedule, seed=3)


TG_SUM_MUTATIONS = {
    # name: (old, new, expected error text or None for wrong output)
    "missing-barrier": (
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  if (sgid == 0)",
        "  if (sgid == 0)",
        None,
    ),
    "off-by-one-partials": ("lid < n_sg ? partial[lid]", "lid <= n_sg ? partial[lid]", None),
    "wrong-lane": ("if (lane == 0) {\n    partial", "if (lane == 1 && sgid > 0) {\n    partial", None),
    "early-return-before-barrier": (
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  if (sgid",
        "  if (lid >= 200) {\n    return;\n  }\n"
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  if (sgid",
        r"exited",
    ),
    "barrier-in-branch": (
        "partial[sgid] = v;\n  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);",
        "partial[sgid] = v;\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }",
        r"barrier|deadlock",
    ),
    "divergent-collectives": (
        "v = simd_sum(v);",
        "v = lane < 16 ? simd_sum(v) : simd_max(v);",
        r"divergent simd collectives",
    ),
}


@pytest.mark.parametrize("mutation", sorted(TG_SUM_MUTATIONS))
def test_tg_sum_mutation_is_caught(tmp_path, mutation):
    old, new, err = TG_SUM_MUTATIONS[mutation]
    lib = harness_copy(tmp_path, old, new)
    with pytest.raises((AssertionError, MetalEmulatorError)) as e:
        run_all_schedules(lib)
    if err:
        assert e.type is MetalEmulatorError and re.search(err, str(e.value)), str(e.value)


def test_missing_barrier_needs_several_schedules(tmp_path):
    """Why tests run more than one schedule: the reverse order hides this bug."""
    old, new, _ = TG_SUM_MUTATIONS["missing-barrier"]
    lib = harness_copy(tmp_path, old, new)
    run_tg_sum(lib, np.float32, "reverse")
    with pytest.raises(AssertionError):
        run_tg_sum(lib, np.float32, "forward")


# ---- the executor without Python: other context switches, arm64 ----------------------
def build_selftest(cxx, flags, out: Path) -> Path:
    from metal_emulator import RUNTIME_DIR, generate_source, kernel_flags

    src = out.with_suffix(".cpp")
    src.write_text(generate_source(HARNESS, cxx))
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        *kernel_flags(cxx),
        *flags,
        str(src),
        str(RUNTIME_DIR / "msl_runtime.cpp"),
        str(HERE / "native" / "selftest_main.cpp"),
        "-o",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.mark.parametrize("switch", ["asm", "ucontext"])
def test_selftest_native(tmp_path, switch):
    exe = build_selftest(
        shutil.which("g++"), ["-DMSL_USE_UCONTEXT"] if switch == "ucontext" else [], tmp_path / "selftest"
    )
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_selftest_arm64_under_qemu(tmp_path):
    """aarch64 Linux: the ucontext fiber switch and the shim on a different ISA."""
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip(
            "needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: "
            "g++-aarch64-linux-gnu qemu-user; .ci/run installs them)"
        )
    exe = build_selftest(cxx, ["-static"], tmp_path / "selftest")
    r = subprocess.run([qemu, str(exe)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


# ---- collectives ----------------------------------------------------------------------
def expected_collectives(x, active=32):
    """numpy model of the `collectives` kernel for one full simdgroup."""
    n = len(x)
    lane = np.arange(n)
    own = lambda src, ok: np.where(ok, x[np.clip(src, 0, n - 1)], x)
    o = np.zeros((n, 12), np.float64)
    o[:, 0] = x.sum()
    o[:, 1] = x.max()
    o[:, 2] = x.min()
    o[:, 3] = own(lane + 3, lane + 3 < 32)
    o[:, 4] = own(lane - 2, lane >= 2)
    o[:, 5] = x[lane ^ 5]
    o[:, 6] = x[7]
    o[:, 7] = x[31 - lane]
    o[:, 8] = np.cumsum(x) - x
    o[:, 9] = np.cumsum(x)
    o[:, 10] = float((x > 0).all()) + 2.0 * float((x > 0.5).any())
    s = x.astype(np.float64)
    for d in (16, 8, 4, 2, 1):
        s = s + np.where(lane + d < 32, s[np.clip(lane + d, 0, n - 1)], s)
    o[:, 11] = s
    return o


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_collectives(lib, schedule):
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    out = np.zeros((64, 12), np.float32)
    lib.run("collectives", {0: x, 1: out}, grid=(1, 1, 1), threadgroup=(64, 1, 1), schedule=schedule)
    for sg in range(2):
        want = expected_collectives(x[32 * sg : 32 * (sg + 1)].astype(np.float64))
        np.testing.assert_allclose(out[32 * sg : 32 * (sg + 1)], want, rtol=1e-5, atol=1e-5)


def test_partial_simdgroup(lib):
    """40 threads: the second simdgroup has 8 lanes. Reductions cover the active lanes;
    reading an absent lane gives poison (NaN), not a plausible value."""
    x = np.arange(1, 41, dtype=np.float32)
    out = np.zeros((40, 12), np.float32)
    lib.run("collectives", {0: x, 1: out}, grid=(1, 1, 1), threadgroup=(40, 1, 1))
    tail = out[32:]
    np.testing.assert_array_equal(tail[:, 0], x[32:].sum())
    np.testing.assert_array_equal(tail[:, 1], 40)
    np.testing.assert_array_equal(tail[:, 6], x[39])  # lane 7 is present
    assert np.isnan(tail[5, 3])  # lane 5 + 3 = lane 8 does not exist


# ---- an MLX-style quantized GEMV ------------------------------------------------------
QMV = {
    "qmv4_float_g64": ("float32", 64),
    "qmv4_half_g32": ("float16", 32),
    "qmv4_bfloat_g128": ("bfloat16", 128),
}


def run_qmv4(lib, name, schedule, N=24, K=512):
    import mlx.core as mx

    dtype, G = QMV[name]
    mxdt = getattr(mx, dtype)
    rng = np.random.default_rng(11)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) * 0.1).astype(mxdt)
    wq, s, b = mx.quantize(w, group_size=G, bits=4, stream=mx.cpu)
    x = mx.array(rng.standard_normal(K).astype(np.float32)).astype(mxdt)
    want = np.array(
        mx.dequantize(wq, s, b, group_size=G, bits=4, stream=mx.cpu).astype(mx.float32)
    ) @ np.array(x.astype(mx.float32))
    as_np = lambda a: np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)
    y = np.zeros(N, np.uint16 if dtype == "bfloat16" else getattr(np, dtype))
    lib.run(
        name,
        {0: np.array(wq), 1: as_np(s), 2: as_np(b), 3: as_np(x), 4: y, 5: np.int32(K)},
        grid=(1, N // 8, 1),
        threadgroup=(32, 2, 1),
        schedule=schedule,
    )
    got = (
        np.array(mx.array(y).view(mx.bfloat16).astype(mx.float32))
        if dtype == "bfloat16"
        else y.astype(np.float32)
    )
    tol = 1e-4 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("schedule", ("forward", "random"))
@pytest.mark.parametrize("name", sorted(QMV))
def test_qmv4_matches_dequantized_matmul(lib, name, schedule):
    run_qmv4(lib, name, schedule)


@pytest.mark.parametrize(
    "old,new",
    [
        ("float(byte >> 4)", "float(byte >> 3)"),
        ("k / G]);\n      const float b", "(k + 8) / G]);\n      const float b"),
    ],
)
def test_qmv4_mutation_is_caught(tmp_path, old, new):
    lib = harness_copy(tmp_path, old, new)
    with pytest.raises((AssertionError, MetalEmulatorError)):
        for name in sorted(QMV):
            run_qmv4(lib, name, "forward")


# ---- vectors, threadgroup arguments ---------------------------------------------------
def test_vec_ops(lib):
    rows, cols = 5, 7
    a = np.random.default_rng(2).standard_normal((rows, cols, 4)).astype(np.float32)
    out = np.zeros((rows, cols, 4), np.float32)
    lib.run(
        "vec_ops",
        {0: a, 1: out, 2: np.array([rows, cols], np.uint32)},
        grid=(2, 2, 1),
        threadgroup=(4, 4, 1),
        schedule="random",
    )
    want = np.stack(
        [
            np.abs(a).sum(-1),
            np.clip(a[..., 0], -0.5, 0.5),
            -a[..., 1],
            a[..., 3].astype(np.float16).astype(np.float32) + np.maximum(a[..., 2], a[..., 3]),
        ],
        -1,
    )
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_threadgroup_argument(lib, schedule):
    x = np.arange(256, dtype=np.float32)
    y = np.zeros_like(x)
    lib.run(
        "tg_reverse",
        {0: x, 1: y},
        grid=(4, 1, 1),
        threadgroup=(64, 1, 1),
        threadgroup_memory={0: 64 * 4},
        schedule=schedule,
    )
    np.testing.assert_array_equal(y, x.reshape(4, 64)[:, ::-1].ravel())


# ---- errors ---------------------------------------------------------------------------
def test_threadgroup_memory_limit(lib):
    with pytest.raises(
        MetalEmulatorError,
        match=r"threadgroup memory of 36000 bytes \(with "
        r"big\) exceeds the 32768-byte limit",
    ):
        lib.run("tg_too_big", {0: np.zeros(64, np.float32)}, threadgroup=(64, 1, 1))
    with pytest.raises(MetalEmulatorError, match="limit"):
        lib.run(
            "tg_reverse",
            {0: np.zeros(64, np.float32), 1: np.zeros(64, np.float32)},
            threadgroup=(64, 1, 1),
            threadgroup_memory={0: 40000},
        )
    with pytest.raises(MetalEmulatorError, match=r"threadgroup_memory"):
        lib.run(
            "tg_reverse", {0: np.zeros(64, np.float32), 1: np.zeros(64, np.float32)}, threadgroup=(64, 1, 1)
        )


def test_out_of_bounds_is_reported(lib):
    x = np.arange(128, dtype=np.float32)
    with pytest.raises(
        MetalEmulatorError,
        match=r"out-of-bounds write of 4 bytes at byte "
        r"offset 508 of buffer\(1\) \(508 bytes\)",
    ):
        lib.run(
            "tg_reverse",
            {0: x, 1: np.zeros(127, np.float32)},
            grid=(2, 1, 1),
            threadgroup=(64, 1, 1),
            threadgroup_memory={0: 256},
        )
    with pytest.raises(MetalEmulatorError, match=r"out-of-bounds read .* of buffer\(0\)"):
        lib.run(
            "tg_reverse",
            {0: x[:100].copy(), 1: np.zeros(128, np.float32)},
            grid=(2, 1, 1),
            threadgroup=(64, 1, 1),
            threadgroup_memory={0: 256},
            schedule="reverse",
        )


@pytest.mark.parametrize(
    "old,new,where",
    [
        ("buf[lid] = x[gid];", "buf[lid + 1] = x[gid];", r"256 of \[\[threadgroup\(0\)\]\] \(256 bytes\)"),
        ("partial[sgid] = v;", "partial[sgid + 32] = v;", r"128 of partial \(128 bytes\)"),
        ("partial[sgid] = v;", "partial[int(sgid) - 1] = v;", r"-4 of partial \(128 bytes\)"),
    ],
)
def test_threadgroup_out_of_bounds_write_is_reported(tmp_path, old, new, where):
    lib = harness_copy(tmp_path, old, new)
    with pytest.raises(
        MetalEmulatorError, match="threadgroup memory written out of bounds at byte offset " + where
    ):
        run_all_schedules(lib) if "partial" in old else lib.run(
            "tg_reverse",
            {0: np.zeros(64, np.float32), 1: np.zeros(64, np.float32)},
            threadgroup=(64, 1, 1),
            threadgroup_memory={0: 256},
        )


def test_binding_errors(lib):
    x = np.zeros(64, np.float32)
    y = np.zeros(64, np.float32)
    y.flags.writeable = False
    with pytest.raises(MetalEmulatorError, match=r"read-only"):
        lib.run("tg_reverse", {0: x, 1: y}, threadgroup=(64, 1, 1), threadgroup_memory={0: 256})
    with pytest.raises(MetalEmulatorError, match=r"buffer\(1\) .* not bound"):
        lib.run("tg_reverse", {0: x}, threadgroup=(64, 1, 1), threadgroup_memory={0: 256})
    with pytest.raises(MetalEmulatorError, match=r"4 bytes but 8 bytes"):
        lib.run("tg_sum_float", {0: x, 1: x.copy(), 2: np.uint64(64)}, threadgroup=(64, 1, 1))
    with pytest.raises(TypeError, match=r"np.uint32"):
        lib.run("tg_sum_float", {0: x, 1: x.copy(), 2: 64}, threadgroup=(64, 1, 1))
    with pytest.raises(KeyError):
        lib.run("no_such_kernel", {})


def test_bytes_counted(lib):
    x = np.arange(256, dtype=np.float32)
    y = np.zeros_like(x)
    res = lib.run(
        "tg_reverse",
        {0: x, 1: y},
        grid=(4, 1, 1),
        threadgroup=(64, 1, 1),
        threadgroup_memory={0: 256},
        count_unique=True,
    )
    assert (res.bytes_read, res.bytes_written) == (1024, 1024)
    assert (res.unique_bytes_read, res.unique_bytes_written) == (1024, 1024)
    assert res.threadgroup_memory == 256


# ---- lint -----------------------------------------------------------------------------
def test_metal_sources_pass_lint():
    for src in sorted((REPO_ROOT / "metal").glob("*.metal")):
        assert lint_file(src) == [], src


LINT_CASES = {
    "double": ("  const float n_bins", "  double unused = 0;\n  const float n_bins"),
    "std": ("  const float n_bins", "  float unused = std::max(1.0f, 2.0f);\n  const float n_bins"),
    "static-local": ("  const float n_bins", "  static int calls = 0;\n  const float n_bins"),
    "recursion": (
        '#include "quant_math.h"\n',
        '#include "quant_math.h"\n'
        "inline int mq_even(int n);\n"
        "inline int mq_odd(int n) { return n == 0 ? 0 : mq_even(n - 1); }\n"
        "inline int mq_even(int n) { return n == 0 ? 1 : mq_odd(n - 1); }\n",
    ),
}


@pytest.mark.parametrize("rule", sorted(LINT_CASES))
def test_lint_rejects(tmp_path, rule):
    d = tmp_path / "metal"
    shutil.copytree(REPO_ROOT / "metal", d)
    old, new = LINT_CASES[rule]
    text = (d / "requantize.h").read_text()
    assert old in text
    (d / "requantize.h").write_text(text.replace(old, new, 1))
    issues = lint_file(d / "requantize.metal")
    assert [i.rule for i in issues] == [rule], issues
    assert "requantize.h:" in str(issues[0])
    with pytest.raises(MetalLintError, match=rule):
        MetalLibrary(d / "requantize.metal", cache=tmp_path)


def test_cache_key_covers_includes(tmp_path):
    """Editing a header the kernel includes gives a new build; an unchanged tree reuses it."""
    d = tmp_path / "metal"
    shutil.copytree(REPO_ROOT / "metal", d)
    only = ["requantize_int4_b4_g64_sg32_float32_float32"]
    build = lambda: MetalLibrary(d / "requantize.metal", only=only, cache=tmp_path).so_path
    first = build()
    assert build() == first
    (d / "quant_math.h").write_text(
        (d / "quant_math.h").read_text().replace("const float eps = 1e-7f;", "const float eps = 2e-7f;")
    )
    assert build() != first


def test_host_headers_are_not_reachable(tmp_path):
    p = tmp_path / "k.metal"
    p.write_text("#include <cmath>\n#include <metal_stdlib>\n")
    with pytest.raises(MetalCompileError, match="cmath"):
        MetalLibrary(p, cache=tmp_path)


# ---- coverage of metal/ ---------------------------------------------------------------
def test_every_metal_kernel_is_covered():
    """Every host-named kernel in metal/ must be run by some emulator test module."""
    for src in sorted((REPO_ROOT / "metal").glob("*.metal")):
        for name in MetalLibrary(src).kernels:
            assert any(name.startswith(p) for p in COVERED), (
                f"{src.name}: kernel {name} has no emulator test; add its tests and its prefix to COVERED"
            )


# ---- strict mode (clang address spaces) ------------------------------------------------
needs_clang = pytest.mark.skipif(
    not clang_available(), reason="strict mode needs clang++ >= 15 (apt-get install clang-19)"
)

ADDRESS_SPACE_KERNEL = """
#include <metal_stdlib>
using namespace metal;
inline float first(%s float* p) { return p[0]; }
[[kernel]] void k(device float* y [[buffer(0)]], uint lid [[thread_position_in_threadgroup]]) {
  threadgroup float buf[32];
  buf[lid] = float(lid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = first(%s);
}
"""


def address_space_lib(tmp_path, param_space, arg, strict):
    p = tmp_path / f"as_{param_space}_{strict}.metal"
    p.write_text(ADDRESS_SPACE_KERNEL % (param_space, arg))
    return MetalLibrary(p, strict=strict, cache=tmp_path)


@needs_clang
def test_strict_mode_rejects_address_space_mismatch(tmp_path):
    # A threadgroup pointer where a thread pointer is expected: only strict mode sees it.
    address_space_lib(tmp_path, "thread", "buf", strict=False)
    with pytest.raises(MetalCompileError, match="no known conversion|address space"):
        address_space_lib(tmp_path, "thread", "buf", strict=True)
    ok = address_space_lib(tmp_path, "threadgroup", "buf", strict=True)
    y = np.zeros(32, np.float32)
    ok.run("k", {0: y}, threadgroup=(32, 1, 1))
    assert (y == 0).all()


def test_device_pointer_mismatch_rejected_in_both_modes(tmp_path):
    # Device pointers are their own type, so this fails with g++ too.
    with pytest.raises(MetalCompileError):
        address_space_lib(tmp_path, "device", "buf", strict=False)


@needs_clang
def test_strict_mode_runs_the_real_kernels(tmp_path):
    from metal_emulator import requantize_check as rq

    only = [
        rq.kernel_name(4, 64, 32, "float32", "bfloat16"),
        rq.kernel_name(3, 128, 64, "bfloat16", "float16"),
    ]
    lib = MetalLibrary(REPO_ROOT / "metal" / "requantize.metal", strict=True, only=only, cache=tmp_path)
    packed, scales = rq.make_inputs(np.random.default_rng(4), (9, 512), 64, "bfloat16")
    rq.check(lib, packed, scales, 3, 128, 64, "bfloat16", "float16", "random")
    for schedule in ("forward", "reverse"):
        s = rq.make_inputs(np.random.default_rng(5), (9, 512), 32, "float32")
        rq.check(lib, *s, 4, 64, 32, "float32", "bfloat16", schedule)
    strict_tg = MetalLibrary(HARNESS, strict=True, cache=tmp_path)
    run_all_schedules(strict_tg)


# ---- conversions, translation details -------------------------------------------------
def bfloat16_rne(x: np.ndarray) -> np.ndarray:
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r)


def test_conversions_round_to_nearest_even(lib):
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    # Exact ties for bfloat16 (low 16 bits 0x8000) and for half, with both parities.
    bits[:64] = (bits[:64] & 0xFFFF0000) | 0x8000
    ties_half = (np.arange(1, 65, dtype=np.float32) * 2**-10 + 1) + 2**-11
    x = np.concatenate(
        [bits.view(np.float32), ties_half, np.array([np.inf, -np.inf, np.nan, 65520.0, 3.0e38], np.float32)]
    )
    xs = np.resize(x, (x.size + 7) // 8 * 8)  # whole threadgroups of 8
    b = np.zeros(xs.size, np.uint16)
    h = np.zeros(xs.size, np.float16)
    lib.run("convert", {0: xs, 1: b, 2: h}, grid=(xs.size // 8, 1, 1), threadgroup=(8, 1, 1))
    np.testing.assert_array_equal(b, bfloat16_rne(xs))
    with np.errstate(over="ignore"):
        want_h = xs.astype(np.float16)
    np.testing.assert_array_equal(
        h.view(np.uint16)[~np.isnan(want_h)], want_h.view(np.uint16)[~np.isnan(want_h)]
    )
    assert np.isnan(h[np.isnan(want_h)]).all()


def test_deadlock_is_reported(tmp_path):
    p = tmp_path / "deadlock.metal"
    p.write_text("""
#include <metal_stdlib>
using namespace metal;
[[kernel]] void k(device float* y [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
  if (lane == 0) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    y[lane] = simd_sum(1.0f);
  }
}
""")
    lib = MetalLibrary(p, cache=tmp_path)
    with pytest.raises(
        MetalEmulatorError,
        match=r"deadlock .* 1 thread\(s\) wait at "
        r"threadgroup_barrier .* 31 lane\(s\) of simdgroup 0 wait at simd_sum",
    ):
        lib.run("k", {0: np.zeros(32, np.float32)}, threadgroup=(32, 1, 1))


def test_non_uniform_shuffle_delta_is_reported(lib, tmp_path):
    lib = harness_copy(tmp_path, "o[3] = simd_shuffle_down(v, 3);", "o[3] = simd_shuffle_down(v, lane % 2);")
    with pytest.raises(
        MetalEmulatorError,
        match=r"simd_shuffle_down .* lane \d+ passes [01], "
        r"lane \d+ passes [01]; Metal requires the same value in every lane",
    ):
        lib.run(
            "collectives",
            {0: np.zeros(32, np.float32), 1: np.zeros(32 * 12, np.float32)},
            threadgroup=(32, 1, 1),
        )


def test_threadgroup_initializer_is_rejected(tmp_path):
    with pytest.raises(
        MetalCompileError,
        match=r"harness\.metal:\d+: threadgroup variables "
        r"cannot have initializers",
    ):
        harness_copy(tmp_path, "threadgroup float partial[32];", "threadgroup float partial[32] = {};")


def test_compile_errors_point_at_metal_lines(tmp_path):
    p = tmp_path / "bad.metal"
    p.write_text(
        "#include <metal_stdlib>\nusing namespace metal;\n"
        "[[kernel]] void k(device float* y [[buffer(0)]]) {\n"
        "  y[0] = undefined_name;\n}\n"
    )
    with pytest.raises(MetalCompileError, match=r"bad\.metal:4"):
        MetalLibrary(p, cache=tmp_path)
