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


def anon_huge_bytes_in(addr: int, nbytes: int) -> int:
    """AnonHugePages of the mappings overlapping [addr, addr + nbytes) (/proc/self/smaps;
    madvise splits a mapping where the advice starts and ends)."""
    total, inside = 0, False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) < addr + nbytes and addr < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def address(a: mx.array) -> int:
    return np.array(a, copy=False).__array_interface__["data"][0]


def test_contents_unchanged_and_bytes_reported():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 2**32, (16, 1024, 1024), dtype=np.uint32)  # 64 MiB
    a = mx.array(ref)
    b = mx.array(rng.standard_normal((8, 1024, 1024)).astype(np.float32))
    b_ref = np.array(b)
    n = moequant.huge_pages({"w": a, "s": [b, 3]})
    assert isinstance(n, int)
    np.testing.assert_array_equal(np.array(a), ref)
    np.testing.assert_array_equal(np.array(b), b_ref)
    if not thp_available():
        assert n == 0
        return
    # At most the 2 MiB-aligned insides of the buffers; what is reported is (but for
    # a page or two the kernel may split again at once) really in huge pages. Best
    # effort: the kernel may have none free right now.
    assert 0 <= n <= a.nbytes + b.nbytes
    got = anon_huge_bytes_in(address(a), a.nbytes) + anon_huge_bytes_in(address(b), b.nbytes)
    assert got >= 0.9 * n


@pytest.mark.skipif(not thp_available(), reason="needs Linux transparent huge pages")
def test_module_parameters_reach_huge_pages():
    m = nn.Linear(4096, 4096)  # 64 MiB of float32 weight
    n = moequant.huge_pages(m)
    # What is reported is really in huge pages (best effort: possibly nothing).
    assert n in (0, 62 * 2**20, 64 * 2**20)
    assert anon_huge_bytes_in(address(m.weight), m.weight.nbytes) >= 0.9 * n


@pytest.mark.skipif(not thp_available(), reason="needs Linux transparent huge pages")
def test_advice_only_reports_the_aligned_inside():
    """collapse=False only advises: the 2 MiB-aligned inside of each buffer, counted
    exactly; min_bytes decides which arrays are advised."""
    a = mx.zeros((3 << 20,), dtype=mx.uint8) + 1  # 3 MiB
    mx.eval(a)
    lo = (address(a) + (2 << 20) - 1) & ~((2 << 20) - 1)
    hi = (address(a) + a.nbytes) & ~((2 << 20) - 1)
    assert moequant.huge_pages(a, collapse=False) == 0  # below the default 4 MiB
    assert moequant.huge_pages(a, collapse=False, min_bytes=1 << 20) == max(0, hi - lo)


def test_small_arrays_are_left_alone():
    assert moequant.huge_pages(mx.zeros((1024,))) == 0
    assert moequant.huge_pages([]) == 0
