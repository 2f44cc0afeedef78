"""The output layout and its sizes: which tensors an item becomes, how many bytes they
take, and the per-component totals. One definition for `moequant plan` (predicted) and
`moequant convert` (what it writes).

Sizes are exact: a quantized (..., K) weight takes K*bits/32 uint32 words per row plus a
bf16 scale and a bf16 bias per group (bits + 32/group_size bits per weight); unquantized
tensors keep their dtype (bf16; the router's e_score_correction_bias stays float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .checkpoint import COMPONENTS, Item
from .recipes import Decision

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint32": 4}
SCALE_DTYPE = "bfloat16"  # scales and biases are written in bf16

OutputTensor = Tuple[str, Tuple[int, ...], str]  # (suffix, shape, dtype)


def output_tensors(item: Item, d: Optional[Decision]) -> List[OutputTensor]:
    """(suffix, shape, dtype) of the tensors an item becomes; suffix is appended to its path."""
    if not item.quantizable:
        return [("", item.shape, item.dtype)]
    if d is None:
        return [(".weight", item.shape, "bfloat16")]
    *lead, k = item.shape
    return [
        (".weight", (*lead, k * d.bits // 32), "uint32"),
        (".scales", (*lead, k // d.group_size), SCALE_DTYPE),
        (".biases", (*lead, k // d.group_size), SCALE_DTYPE),
    ]


def tensor_bytes(shape, dtype: str) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


def item_bytes(item: Item, d: Optional[Decision]) -> int:
    return sum(tensor_bytes(s, t) for _, s, t in output_tensors(item, d))


def describe(d: Optional[Decision], item: Item) -> str:
    if d is None:
        return "fp32" if item.dtype == "float32" else "bf16"
    return (
        f"{d.bits}-bit g{d.group_size}"
        + (" (INT4 repack)" if d.repack else "")
        + (f" {d.fit}" if not d.repack and d.fit != "minmax" else "")
    )


@dataclass
class ComponentRow:
    name: str
    params: int = 0
    bytes: int = 0
    kinds: Dict[str, int] = None  # description -> params

    @property
    def bpw(self) -> float:
        return self.bytes * 8 / self.params if self.params else 0.0


def summarize(
    items: List[Item], decisions: Dict[str, Optional[Decision]], sizes: Optional[Dict[str, int]] = None
) -> List[ComponentRow]:
    """Per-component rows. ``sizes`` (path -> bytes) overrides predicted sizes, e.g. with
    the bytes actually written."""
    rows = {c: ComponentRow(c, 0, 0, {}) for c in COMPONENTS}
    for it in items:
        d = decisions.get(it.path)
        r = rows[it.component]
        r.params += it.params
        r.bytes += sizes[it.path] if sizes is not None else item_bytes(it, d)
        desc = describe(d, it)
        r.kinds[desc] = r.kinds.get(desc, 0) + it.params
    return [r for r in rows.values() if r.params]


def expert_bpw(rows: List[ComponentRow]) -> float:
    """Bits per weight of the routed experts (the rows named routed*)."""
    rs = [r for r in rows if r.name.startswith("routed")]
    return sum(r.bytes for r in rs) * 8 / max(1, sum(r.params for r in rs))


def fmt_bytes(n: float) -> str:
    for div, suf in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if n >= div:
            return f"{n / div:.2f} {suf}"
    return f"{int(n)} B"
