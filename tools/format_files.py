"""The C++ sources tools/format.sh formats and tests/test_format.py checks: tracked files
(git ls-files; every file below the tree without git) under csrc/ and tests/ ending in
.cpp, .cc, .h, .hpp or .inc. Metal sources (metal/, tests/metal_emulator/kernels/) are
left out: clang-format does not know Metal, and the emulator's translator reads them.
`python tools/format_files.py` prints them NUL-separated (for xargs -0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPP_EXTS = (".cpp", ".cc", ".h", ".hpp", ".inc")
CPP_DIRS = ("csrc/", "tests/")
EXCLUDE = ("tests/metal_emulator/kernels/",)


def tracked(root: Path = ROOT) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
        return [p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


def cpp_files(root: Path = ROOT) -> list[str]:
    return sorted(
        p
        for p in tracked(root)
        if p.endswith(CPP_EXTS)
        and p.startswith(CPP_DIRS)
        and not p.startswith(EXCLUDE)
        and (root / p).is_file()
    )


if __name__ == "__main__":
    sys.stdout.write("".join(p + "\0" for p in cpp_files()))
