import os
import sys

import pytest

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
