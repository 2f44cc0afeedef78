import os
import sys

import pytest

import moequant

# Test helpers (oracles, fixtures) live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))

from moequant.testing import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_moequant_cache(tmp_path_factory):
    """moequant's caches (eval reference caches, the weight-hash memo) go to a temporary
    directory, never to the user's ~/.cache, also in subprocesses the tests start."""
    old = os.environ.get("MOEQUANT_CACHE")
    os.environ["MOEQUANT_CACHE"] = str(tmp_path_factory.mktemp("moequant-cache"))
    yield
    if old is None:
        os.environ.pop("MOEQUANT_CACHE", None)
    else:
        os.environ["MOEQUANT_CACHE"] = old


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


@pytest.fixture(params=["avx512vnni", "avx512", "avx2int", "avx2", "scalar"])
def cpu_path(request, monkeypatch):
    """Run each test on every CPU kernel this machine has (the SIMD ones and the
    portable fallback)."""
    best = moequant.moe_cpu_path()
    order = ["scalar", "avx2", "avx2int", "avx512", "avx512vnni"]
    if order.index(request.param) > order.index(best):
        pytest.skip(f"this machine/build runs at most the {best} kernels")
    if request.param != best:
        monkeypatch.setenv("MOEQUANT_CPU_PATH", request.param)
    assert moequant.moe_cpu_path() == request.param
    return request.param
