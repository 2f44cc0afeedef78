"""MOEQUANT_METAL=auto: a metallib that fails to compile leaves a working CPU-only
install. Builds the extension once (a few minutes) with a Metal compiler that does not
exist, the way a Mac whose Metal toolchain rejects the kernels would fail, installs it
into a staging directory next to the Python package, and checks: the warning at build,
the warning at import, metal_available()/metal_status(), a CPU op, and the message of
a GPU-stream call (the staged module loaded as moequant._ext). Then MOEQUANT_METAL=on with the same compiler must fail the build,
and a bad MOEQUANT_METAL value the configure step (both without recompiling C++).
MOEQUANT_FALLBACK_BUILD_DIR keeps the build between runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_sanitizers import _tool

ROOT = Path(__file__).resolve().parent.parent
MISSING = "/nonexistent/moequant-test/metal"


def _cmake(build: Path, *defs: str) -> list[str]:
    cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
    assert cmake, 'cmake not found: `pip install ".[test]"` installs it'
    ninja = _tool("ninja", "BIN_DIR", "ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    return [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(build),
        *gen,
        f"-DPython_EXECUTABLE={sys.executable}",
        # Only the fallback is under test: build fast.
        "-DCMAKE_BUILD_TYPE=Release",
        "-DCMAKE_CXX_FLAGS_RELEASE=-O0 -g0",
        *defs,
    ]


def _run(cmd, timeout=1800):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_auto_falls_back_to_cpu_only(tmp_path):
    cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
    build = Path(os.environ.get("MOEQUANT_FALLBACK_BUILD_DIR") or tmp_path / "build")
    r = _run(_cmake(build, "-DMOEQUANT_METAL=auto", f"-DMOEQUANT_METAL_COMPILER={MISSING}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A reused build dir (MOEQUANT_FALLBACK_BUILD_DIR) must rerun the metallib step.
    (build / "moequant_metallib.stamp").unlink(missing_ok=True)
    r = _run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)])
    log = " ".join((r.stdout + r.stderr).split())  # CMake wraps warning text
    assert r.returncode == 0, log[-5000:]
    assert f"moequant (MOEQUANT_METAL=auto): the Metal compiler ({MISSING}) failed" in log, log[-5000:]
    assert "Continuing with a CPU-only install" in log
    assert not (build / "moequant_kernels.metallib").exists()

    stage = tmp_path / "stage"
    r = _run([cmake, "--install", str(build), "--prefix", str(stage)])
    assert r.returncode == 0, r.stdout + r.stderr
    pkg = stage / "moequant"
    assert (pkg / "moequant_metal_error.txt").exists()
    (ext,) = pkg.glob("_ext*.so")

    # The staged module as moequant._ext (whatever moequant install is on the path: an
    # editable one's import hook would win over PYTHONPATH), then import moequant.
    probe = r"""
import importlib.util, sys, warnings
import mlx.core as mx, numpy as np
spec = importlib.util.spec_from_file_location("moequant._ext", EXT)
ext = importlib.util.module_from_spec(spec)
sys.modules["moequant._ext"] = ext
spec.loader.exec_module(ext)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import moequant
assert moequant.ops._ext is ext
msgs = [str(x.message) for x in w if "moequant" in str(x.message)]
assert len(msgs) == 1 and "failed to compile" in msgs[0], msgs
print("WARN:", msgs[0])
ok, reason = moequant.metal_status()
assert not ok and moequant.metal_available() is False
assert "failed to compile" in reason and "nonexistent" in reason, reason
packed = mx.array(np.arange(16, dtype=np.uint32).reshape(2, 8) * 0x11111111)
wq, s, b = moequant.requantize_int4(packed, mx.ones((2, 2)), bits=4, stream=mx.cpu)
mx.eval(wq, s, b)
try:
    moequant.requantize_int4(packed, mx.ones((2, 2)), bits=4, stream=mx.gpu)
except RuntimeError as e:
    assert "failed to compile" in str(e) and "stream=mx.cpu" in str(e), e
    print("GPU:", e)
else:
    raise AssertionError("a GPU-stream call did not raise")
""".replace("EXT", repr(str(ext)))
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARN:" in r.stdout and "GPU:" in r.stdout

    # on: the same failure stops the build (only the metallib step reruns).
    r = _run(_cmake(build, "-DMOEQUANT_METAL=on", f"-DMOEQUANT_METAL_COMPILER={MISSING}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (build / "moequant_metallib.stamp").unlink(missing_ok=True)
    r = _run([cmake, "--build", str(build)])
    assert r.returncode != 0
    assert f"moequant (MOEQUANT_METAL=on): the Metal compiler ({MISSING}) failed" in " ".join(
        (r.stdout + r.stderr).split()
    )

    r = _run(_cmake(build, "-DMOEQUANT_METAL=sometimes"))
    assert r.returncode != 0
    assert "MOEQUANT_METAL must be auto, on or off" in " ".join((r.stdout + r.stderr).split())
