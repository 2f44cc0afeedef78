"""The native-op tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of
the extension.

The CMake project is configured into a temporary directory with -fsanitize=address,
undefined (UBSan errors are fatal), and tests/test_requantize.py, test_requantize_fit.py,
test_moe_swiglu.py, test_mla_decode_attention.py, test_dense_linear.py,
test_quantized_multi_linear.py and test_mla_decode_core.py run in a child pytest with libasan preloaded (the python
binary is not instrumented) and the sanitized module in place of moequant._ext
(tests/sanitizer_plugin.py). Any sanitizer report fails the run. Skipped only when the
C++ compiler has no sanitizer runtime. MOEQUANT_SANITIZE_BUILD_DIR keeps the build
between runs (incremental rebuilds while working on the kernels).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = (
    "tests/test_requantize.py",
    "tests/test_requantize_fit.py",
    "tests/test_moe_swiglu.py",
    "tests/test_mla_decode_attention.py",
    "tests/test_dense_linear.py",
    "tests/test_quantized_multi_linear.py",
    "tests/test_mla_decode_core.py",
)
SANITIZE = "-fsanitize=address,undefined"
# How reports start (ASan; UBSan prints "file:line:col: runtime error: ...").
REPORT_MARKERS = ("ERROR: AddressSanitizer", ": runtime error: ")


def _compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    return cxx


def _runtime(cxx: str, name: str) -> str:
    out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else ""


def _sanitizer_runtime(cxx: str, tmp: Path) -> list[str]:
    """The libraries to preload (libasan, then libstdc++ so that ASan's __cxa_throw
    interceptor finds the real one), or a skip when the compiler cannot sanitize."""
    src = tmp / "probe.cpp"
    src.write_text("int main() { return 0; }\n")
    probe = subprocess.run(
        [cxx, SANITIZE, str(src), "-o", str(tmp / "probe")], capture_output=True, text=True
    )
    asan, stdcxx = _runtime(cxx, "libasan.so"), _runtime(cxx, "libstdc++.so")
    if probe.returncode != 0 or not asan or not stdcxx:
        pytest.skip(
            f"{cxx} has no AddressSanitizer/UBSan runtime (libasan.so, libubsan.so): "
            f"{probe.stderr.strip()[:200] or 'libasan.so not found'}"
        )
    return [asan, stdcxx]


def _tool(module: str, attr: str, exe: str) -> str | None:
    # Without the pip module, `import cmake` may find the repository's cmake/ folder (an
    # empty namespace package, no CMAKE_BIN_DIR); then, as for any failed lookup, PATH.
    try:
        base = getattr(__import__(module), attr, None)
    except ImportError:
        base = None
    if base is not None and os.path.exists(os.path.join(base, exe)):
        return os.path.join(base, exe)
    return shutil.which(exe)


def _build(cxx: str, build: Path) -> Path:
    cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
    assert cmake, 'cmake not found: `pip install ".[test]"` installs it'
    ninja = _tool("ninja", "BIN_DIR", "ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    flags = f"{SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer"
    configure = [
        cmake,
        "-S",
        str(ROOT),
        "-B",
        str(build),
        *gen,
        f"-DCMAKE_CXX_COMPILER={cxx}",
        f"-DPython_EXECUTABLE={sys.executable}",
        # -O1: fast enough to run the suite, keeps the line tables (-g1) for reports.
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
        "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1",
        f"-DCMAKE_CXX_FLAGS={flags}",
        f"-DCMAKE_SHARED_LINKER_FLAGS={SANITIZE}",
        f"-DCMAKE_MODULE_LINKER_FLAGS={SANITIZE}",
    ]
    for cmd in (configure, [cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    mods = sorted(build.glob("_ext*.so"))
    assert len(mods) == 1, f"expected one _ext module in {build}, found {mods}"
    return mods[0]


def test_native_ops_under_asan_ubsan(tmp_path):
    cxx = _compiler()
    preload = _sanitizer_runtime(cxx, tmp_path)
    build = Path(os.environ.get("MOEQUANT_SANITIZE_BUILD_DIR") or tmp_path / "build")
    ext = _build(cxx, build)

    env = {k: v for k, v in os.environ.items() if k not in ("MOEQUANT_CPU_PATH", "PYTEST_ADDOPTS")}
    env.update(
        LD_PRELOAD=" ".join(preload + [env.get("LD_PRELOAD", "")]).strip(),
        # Python itself leaks by design at exit; everything else is fatal.
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        MOEQUANT_SANITIZED_EXT=str(ext),
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    r = subprocess.run(
        # --capture=sys: pytest's default fd capture would swallow a report when the
        # sanitizer ends the process; this way it reaches r.stderr.
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "--capture=sys",
            "-p",
            "no:cacheprovider",
            "-p",
            "sanitizer_plugin",
            *TESTS,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = r.stdout + r.stderr
    at = min((out.find(m) for m in REPORT_MARKERS if m in out), default=-1)
    assert at < 0, f"sanitizer report (exit {r.returncode}):\n{out[max(0, at - 2000) : at + 6000]}"
    assert r.returncode == 0, f"sanitized native-op tests failed (exit {r.returncode}):\n{out[-6000:]}"
    assert " passed" in r.stdout, out[-2000:]
