"""Device-memory bytes moved per launch by the Metal requantization kernel, counted by
the Metal emulator (tests/metal_emulator), against the minimum the op must move: each
input byte (packed codes, source scales) read once, each output byte written once.

This is the only hardware-independent efficiency figure we have for Metal. "issued"
counts every load and store a thread makes; "unique" counts distinct bytes, i.e. what
a perfect cache would fetch from DRAM. Timing on the emulator means nothing and is
not reported.

The full shapes run on the emulator in well under a second each. --rows N runs N rows
and scales to the full shape instead; the kernel's traffic is the same for every row
(one thread per group, nothing shared across rows), so that scaling is exact.

    python bench/bench_metal_bytes.py [--bits 4] [--group-size 64] [--rows N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from metal_emulator import REPO_ROOT, MetalLibrary  # noqa: E402
from metal_emulator import requantize_check as rq  # noqa: E402

# Kimi K2 routed-expert projections: gate/up (2048 x 7168) and down (7168 x 2048).
SHAPES = {"gate/up 2048x7168": (2048, 7168), "down 7168x2048": (7168, 2048)}
ITEM = {"float32": 4, "float16": 2, "bfloat16": 2}


def fmt(n):
    return f"{n / 2**20:10.3f} MiB"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4, help="output bits (default: %(default)s)")
    ap.add_argument("--group-size", type=int, default=64, help="output group size (default: %(default)s)")
    ap.add_argument(
        "--src-group-size", type=int, default=32, help="INT4 source group size (default: %(default)s)"
    )
    ap.add_argument(
        "--src-dtype",
        default="bfloat16",
        choices=list(ITEM),
        help="source scales dtype (default: %(default)s)",
    )
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=list(ITEM),
        help="output scales/biases dtype (default: %(default)s)",
    )
    ap.add_argument(
        "--rows", type=int, default=0, help="rows to run per shape, scaled to the full shape (0: all rows)"
    )
    return ap


def main():
    a = build_parser().parse_args()
    name = rq.kernel_name(a.bits, a.group_size, a.src_group_size, a.src_dtype, a.dtype)
    lib = MetalLibrary(REPO_ROOT / "metal" / "requantize.metal", only=[name])
    print(f"kernel {name} (launched by the host dispatch, one thread per output group)")
    for label, (rows, K) in SHAPES.items():
        run_rows = rows if a.rows <= 0 else min(a.rows, rows)
        packed, scales = rq.make_inputs(
            np.random.default_rng(0), (run_rows, K), a.src_group_size, a.src_dtype
        )
        t = time.perf_counter()
        *_, res = rq.run_emulated(
            lib,
            packed,
            scales,
            a.bits,
            a.group_size,
            a.src_group_size,
            a.src_dtype,
            a.dtype,
            count_unique=True,
        )
        secs = time.perf_counter() - t
        f = rows / run_rows
        min_read = rows * K // 2 + rows * K // a.src_group_size * ITEM[a.src_dtype]
        min_write = rows * K * a.bits // 8 + 2 * rows * K // a.group_size * ITEM[a.dtype]
        scaled = "" if f == 1 else f", {run_rows} rows run and scaled x{f:g}"
        print(f"\n{label} (rows x K{scaled}; emulated in {secs:.2f} s)")
        print(f"  {'':8}{'issued':>14}{'unique':>14}{'minimum':>14}{'issued/min':>12}{'unique/min':>12}")
        for what, issued, unique, minimum in (
            ("read", res.bytes_read, res.unique_bytes_read, min_read),
            ("written", res.bytes_written, res.unique_bytes_written, min_write),
        ):
            issued, unique = int(issued * f), int(unique * f)
            print(
                f"  {what:8}{fmt(issued)}{fmt(unique)}{fmt(minimum)}"
                f"{issued / minimum:12.3f}{unique / minimum:12.3f}"
            )
        per = {i: (int(r * f), int(w * f)) for i, (r, w) in res.per_buffer.items()}
        print(
            "  per buffer (read, written): "
            + ", ".join(f"{i}: {fmt(r).strip()} / {fmt(w).strip()}" for i, (r, w) in per.items())
        )


if __name__ == "__main__":
    main()
