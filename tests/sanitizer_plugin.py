"""pytest plugin (-p sanitizer_plugin) that makes ``moequant._ext`` the sanitized build
named by MOEQUANT_SANITIZED_EXT, whatever moequant install (editable or not) is on the
path. Loaded by tests/test_sanitizers.py in a child pytest run; not a test module."""

import importlib.util
import os
import sys

import mlx.core  # noqa: F401  (libmlx is loaded before the extension, as moequant does)

_path = os.environ["MOEQUANT_SANITIZED_EXT"]
_spec = importlib.util.spec_from_file_location("moequant._ext", _path)
_ext = importlib.util.module_from_spec(_spec)
# Registered before moequant is imported, so its `from . import _ext` finds this one.
sys.modules["moequant._ext"] = _ext
_spec.loader.exec_module(_ext)

import moequant  # noqa: E402
import moequant.ops  # noqa: E402

moequant._ext = _ext
if moequant.ops._ext is not _ext:
    raise RuntimeError(f"moequant.ops uses {moequant.ops._ext!r}, not the sanitized {_path}")
