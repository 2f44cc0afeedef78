import os
import sys

import pytest

import moequant

# Test helpers (oracles, fixtures) live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

from moequant.testing import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """make_checkpoint with caching: ckpt(flavour, **kwargs) -> a read-only source dir."""
    cache = {}

    def get(flavour="kimi_k25", **kw):
        key = (flavour, repr(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp(flavour), flavour, **kw)
        return cache[key]

    return get


@pytest.fixture(params=["avx512vnni", "avx512", "avx2", "scalar"])
def cpu_path(request, monkeypatch):
    """Run each test on every CPU kernel this machine has (the SIMD ones and the
    portable fallback)."""
    best = moequant.moe_cpu_path()
    order = ["scalar", "avx2", "avx512", "avx512vnni"]
    if order.index(request.param) > order.index(best):
        pytest.skip(f"this machine/build runs at most the {best} kernels")
    if request.param != best:
        monkeypatch.setenv("MOEQUANT_CPU_PATH", request.param)
    assert moequant.moe_cpu_path() == request.param
    return request.param
