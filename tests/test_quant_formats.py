"""The supported bit widths and group sizes are defined once per language: Python's
quant_formats.py and C++'s csrc/common/quant_formats.h must list the same values, and
the ops accept exactly those."""

import re
from pathlib import Path

import mlx.core as mx
import pytest

from moequant import quant_formats
from moequant.ops import quantize

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "common" / "quant_formats.h"


def _header_lists():
    text = HEADER.read_text()
    bits = re.search(r"using AllBits = BitList<([^>]*)>;", text).group(1)
    groups = re.search(r"kGroupSizes\[\] = \{([^}]*)\};", text).group(1)
    kv_bits = re.search(r"using KvCacheBits = BitList<([^>]*)>;", text).group(1)
    as_tuple = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    return as_tuple(bits), as_tuple(groups), as_tuple(kv_bits)


def test_python_and_cpp_lists_agree():
    assert _header_lists() == (quant_formats.BITS, quant_formats.GROUP_SIZES, quant_formats.KV_CACHE_BITS)


@pytest.mark.parametrize("bits", range(1, 10))
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, 256])
def test_quantize_accepts_exactly_the_listed_formats(bits, group_size):
    w = mx.random.normal((4, 256))
    if quant_formats.supported(bits, group_size):
        wq, s, b = quantize(w, bits=bits, group_size=group_size)
        mx.eval(wq, s, b)
        assert wq.shape == (4, 256 * bits // 32)
    else:
        with pytest.raises(
            ValueError, match="bits must be one of 2, 3, 4, 5, 6, 8|group_size must be 32, 64 or 128"
        ):
            quantize(w, bits=bits, group_size=group_size)
