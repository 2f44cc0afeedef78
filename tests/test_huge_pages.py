"""moequant.huge_pages: weights moved into transparent huge pages keep their contents."""

from __future__ import annotations

import pathlib
import re
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import moequant


def thp_available() -> bool:
    p = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return sys.platform.startswith("linux") and p.exists() and "[never]" not in p.read_text()


def anon_huge_mib() -> int:
    text = pathlib.Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"AnonHugePages:\s+(\d+)", text).group(1)) // 1024


def test_contents_unchanged_and_bytes_reported():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 2**32, (16, 1024, 1024), dtype=np.uint32)  # 64 MiB
    a = mx.array(ref)
    b = mx.array(rng.standard_normal((8, 1024, 1024)).astype(np.float32)).astype(mx.bfloat16)
    b_ref = np.array(b.astype(mx.float32))
    n = moequant.huge_pages({"w": a, "s": [b, 3]})
    assert isinstance(n, int)
    np.testing.assert_array_equal(np.array(a), ref)
    np.testing.assert_array_equal(np.array(b.astype(mx.float32)), b_ref)
    if not thp_available():
        assert n == 0
        return
    # Everything but the partial 2 MiB pages at the ends of each buffer (or nothing,
    # if the kernel has no free huge pages right now: the advice is best effort).
    assert n == 0 or a.nbytes + b.nbytes - 8 * 2**20 <= n <= a.nbytes + b.nbytes


@pytest.mark.skipif(not thp_available(), reason="needs Linux transparent huge pages")
def test_module_parameters_reach_huge_pages():
    m = nn.Linear(4096, 4096)  # 64 MiB of float32 weight
    before = anon_huge_mib()
    n = moequant.huge_pages(m)
    # What is reported is really in huge pages (best effort: possibly nothing).
    assert n in (0, 62 * 2**20, 64 * 2**20)
    assert anon_huge_mib() - before >= n // 2**20


def test_small_arrays_are_left_alone():
    assert moequant.huge_pages(mx.zeros((1024,))) == 0
    assert moequant.huge_pages([]) == 0
