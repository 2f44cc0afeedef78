"""The tree is formatted and lint-clean: ruff check (pyproject.toml [tool.ruff]), ruff
format --check, and clang-format (.clang-format) over the C++ sources. To fix a failure:
tools/format.sh (it formats everything in place), then fix by hand what ruff check still
reports (unused imports, undefined names)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("format_files", ROOT / "tools" / "format_files.py")
format_files = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(format_files)


def _run(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: pip install -e '.[test]' (the test extra pins it)")


def test_ruff_check():
    _need("ruff")
    r = _run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."])
    assert r.returncode == 0, (
        f"ruff check found problems (tools/format.sh fixes import order):\n{r.stdout}{r.stderr}"
    )


def test_ruff_format():
    _need("ruff")
    r = _run([sys.executable, "-m", "ruff", "format", "--check", "."])
    assert r.returncode == 0, f"not formatted (run tools/format.sh):\n{r.stdout}{r.stderr}"


def test_clang_format():
    exe = _need("clang_format").get_executable("clang-format")
    files = format_files.cpp_files(ROOT)
    assert any(f.startswith("csrc/") for f in files), files
    r = _run([exe, "--dry-run", "-Werror", *files])
    bad = sorted({line.split(":", 1)[0] for line in r.stderr.splitlines() if ": error:" in line})
    assert r.returncode == 0, f"not formatted (run tools/format.sh): {', '.join(bad) or r.stderr}"
