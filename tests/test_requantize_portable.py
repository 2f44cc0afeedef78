"""The requantize CPU kernel's other code paths, built outside the extension: the
portable scalar path (MOEQUANT_NO_SIMD) natively, and the arm64 NEON path with a cross
compiler under qemu. Both must give the extension's output bit for bit."""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import moequant
from int4_reference import random_int4

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    ROOT / "tests/native/requant_main.cpp",
    ROOT / "csrc/requantize/requantize_cpu.cpp",
    ROOT / "csrc/common/thread_pool.cpp",
]
HEADERS = [
    ROOT / "csrc/requantize/requantize_cpu.h",
    ROOT / "csrc/common/thread_pool.h",
    ROOT / "metal/quant_math.h",
]
MLX_INCLUDE = Path(mx.__file__).parent / "include"


def build(compiler, flags, tmp_root):
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join([compiler, *flags]).encode()
    ).hexdigest()[:16]
    exe = tmp_root / f"requant_{key}"
    if not exe.exists():
        cmd = [
            compiler,
            "-std=c++20",
            "-O2",
            "-ffp-contract=off",
            *flags,
            f"-I{ROOT / 'csrc'}",
            f"-I{ROOT / 'metal'}",
            f"-I{MLX_INCLUDE}",
            *map(str, SOURCES),
            "-o",
            str(exe),
            "-lpthread",
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


def dtype_name(a):
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[a.dtype]


def raw_bytes(a):
    view = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}
    return np.array(a.view(view.get(a.dtype, a.dtype))).tobytes()


def run_driver(exe, runner, packed, scales, bits, g, sg, out_dtype, work):
    work.mkdir(parents=True, exist_ok=True)
    (work / "packed.bin").write_bytes(raw_bytes(packed))
    (work / "scales.bin").write_bytes(raw_bytes(scales))
    rows = packed.size // packed.shape[-1]
    K = packed.shape[-1] * 8
    cmd = [
        *runner,
        str(exe),
        str(bits),
        str(g),
        str(sg),
        dtype_name(scales),
        out_dtype,
        str(rows),
        str(K),
        str(work),
        str(work),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out, [(work / f).read_bytes() for f in ("wq.bin", "scales.bin", "biases.bin")]


CASES = [
    (bits, g, sg, sd)
    for bits in (2, 3, 4, 5, 6, 8)
    for (g, sg) in ((64, 32), (32, 64), (128, 32))
    for sd in ("bfloat16", "float32")
]


def compare_with_extension(exe, runner, tmp_path, expect_simd):
    rng = np.random.default_rng(17)
    for i, (bits, g, sg, sd) in enumerate(CASES):
        packed, scales = random_int4(rng, (37,), 384, sg, sd)
        out_dtype = "float16" if i % 3 == 0 else sd
        ours = moequant.requantize_int4(
            packed,
            scales,
            bits=bits,
            group_size=g,
            src_group_size=sg,
            dtype={"float16": mx.float16, "float32": mx.float32, "bfloat16": mx.bfloat16}[out_dtype],
        )
        stdout, got = run_driver(exe, runner, packed, scales, bits, g, sg, out_dtype, tmp_path / str(i))
        assert f"simd={int(expect_simd)}" in stdout
        for name, a, b in zip(("wq", "scales", "biases"), ours, got):
            assert raw_bytes(a) == b, f"{name} differs for bits={bits} g={g} sg={sg} {sd}"


def compare_minmax_with_extension(exe, runner, tmp_path, any_nan=False):
    """quantize_minmax (float weights, mx.quantize's rule) on the driver's path against
    the extension, special values included. any_nan: a NaN scale or bias may be another
    NaN (arm64's default NaN is positive, x86-64's negative: MLX's own differ alike)."""
    rng = np.random.default_rng(23)
    for i, (bits, g) in enumerate((b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)):
        w = rng.normal(size=(9, 256)).astype(np.float32)
        w[1], w[2, ::7], w[3, ::5], w[4] = 0.0, np.nan, np.inf, np.nan
        w[5] *= 1e-30
        dtype = ("bfloat16", "float32", "float16")[i % 3]
        wa = mx.array(w).astype(getattr(mx, dtype))
        ours = moequant._ext.quantize_minmax(wa, bits=bits, group_size=g, stream=mx.cpu)
        work = tmp_path / f"minmax{i}"
        work.mkdir(parents=True)
        (work / "w.bin").write_bytes(raw_bytes(wa))
        cmd = [*runner, str(exe), "minmax", str(bits), str(g), dtype, "9", "256", str(work)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        for name, a in zip(("wq", "scales", "biases"), ours):
            got = (work / f"{name}.bin").read_bytes()
            if any_nan and name != "wq":
                x = np.frombuffer(raw_bytes(a), np.uint32 if a.dtype == mx.float32 else np.uint16)
                y = np.frombuffer(got, x.dtype)
                b = mx.array(y).view(a.dtype).astype(mx.float32)
                nan = np.isnan(np.array(a.astype(mx.float32))).ravel()
                assert (nan == np.isnan(np.array(b))).all(), f"{name}: NaNs differ, bits={bits} g={g}"
                assert (x[~nan] == y[~nan]).all(), f"{name}: bits={bits} g={g} {dtype}"
            else:
                assert raw_bytes(a) == got, f"{name}: bits={bits} g={g} {dtype}"


def test_portable_path_matches_extension(build_dir, tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = build(cxx, ["-DMOEQUANT_NO_SIMD"], build_dir)
    compare_with_extension(exe, [], tmp_path, expect_simd=False)
    compare_minmax_with_extension(exe, [], tmp_path)


def test_arm64_neon_path_matches_extension(build_dir, tmp_path):
    cxx = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip(
            "needs aarch64-linux-gnu-g++ and qemu-aarch64 "
            "(Debian: g++-aarch64-linux-gnu qemu-user; .ci/run installs them)"
        )
    exe = build(cxx, ["-static"], build_dir)
    compare_with_extension(exe, [qemu], tmp_path, expect_simd=True)
    compare_minmax_with_extension(exe, [qemu], tmp_path, any_nan=True)
