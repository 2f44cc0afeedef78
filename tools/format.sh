#!/bin/sh
# Format the whole tree in place: Python with ruff (import order, then ruff format),
# C++ / Metal with clang-format (.clang-format). tests/test_format.py checks the result.
# Needs the test extra (pip install -e ".[test]": pinned ruff and clang-format).
# Usage: tools/format.sh [PYTHON]   (default: the python on PATH)
set -eu
cd "$(dirname "$0")/.."
PY="${1:-python}"
"$PY" -m ruff check --select I --fix --quiet .
"$PY" -m ruff format --quiet .
"$PY" tools/format_files.py | xargs -0 -r "$("$PY" -c 'import clang_format; print(clang_format.get_executable("clang-format"))')" -i
