"""Per-call cost of moequant.quantized_linear at decode (one row of x), from fixed-cost
shapes (16 rows of W: what a call costs around its kernel) to Kimi's o_proj, on 1 and 2
threads, float32 and bfloat16 x: median and minimum wall time of `mx.eval(op)` over many
calls, and G codes/s per thread at the minimum (compare with bench_linear.py
--kernel-rate). Also the cost of an `mx.eval` of one trivial op, the floor of any call.
Weights on ordinary pages, bf16 scales, group size 64.

    python bench/bench_decode_calls.py [--shapes 16x2048 576x7168 7168x8192] [--bits 4]
                                       [--threads 1 2] [--calls 200]

Pool settings (MOEQUANT_SPIN_US, MOEQUANT_SPIN_YIELD) are read from the environment.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

import moequant

GROUP = 64


def build_parser():
    ap = argparse.ArgumentParser(
        prog="bench_decode_calls.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=["16x2048", "576x7168", "512x8192", "2048x2048", "8192x512", "7168x8192"],
        help="N x K of W (default: fixed-cost, kv_a, equal-size and o_proj shapes)",
    )
    ap.add_argument("--bits", type=int, nargs="+", default=[4], help="bit widths (default 4)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="pool sizes (default 1 2)")
    ap.add_argument(
        "--calls",
        type=int,
        default=200,
        help="timed calls per row (default 200; a tenth of it above 10 M codes)",
    )
    return ap


def make_weight(N, K, bits):
    rng = np.random.default_rng(N + K + bits)
    w = mx.array(rng.integers(0, 2**32, size=(N, K * bits // 32), dtype=np.uint64).astype(np.uint32))
    s = mx.array((rng.random((N, K // GROUP), dtype=np.float32) * 0.002 + 0.001)).astype(mx.bfloat16)
    b = (-(2 ** (bits - 1)) * s.astype(mx.float32)).astype(mx.bfloat16)
    mx.eval(w, s, b)
    return w, s, b


def time_call(fn, n):
    """Median and minimum microseconds of mx.eval(fn()) over n calls after 5 warm-up calls."""
    for _ in range(5):
        mx.eval(fn())
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6, min(ts) * 1e6


def main(argv=None):
    args = build_parser().parse_args(argv)
    mx.set_default_device(mx.cpu)
    shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shapes]
    x0 = mx.zeros((1, 16))
    mx.eval(x0)
    print(
        "# rows %s; mx.eval of one add: median %.1f us, min %.1f us"
        % (moequant.moe_cpu_path(), *time_call(lambda: x0 + 1, args.calls)),
        flush=True,
    )
    saved = moequant.get_num_threads()
    try:
        for th in args.threads:
            moequant.set_num_threads(th)
            for N, K in shapes:
                for bits in args.bits:
                    w, s, b = make_weight(N, K, bits)
                    for dt in (mx.float32, mx.bfloat16):
                        x = mx.array(
                            np.random.default_rng(0).standard_normal((1, K)).astype(np.float32)
                        ).astype(dt)
                        mx.eval(x)
                        n = args.calls if N * K < 10_000_000 else max(10, args.calls // 10)
                        med, mn = time_call(
                            lambda: moequant.quantized_linear(x, w, s, b, bits=bits, group_size=GROUP), n
                        )
                        print(
                            f"threads {th} {N:5d}x{K:5d} {bits}b x={'f32 ' if dt == mx.float32 else 'bf16'}:"
                            f" median {med:8.1f} us  min {mn:8.1f} us  {N * K / mn / 1e3 / th:5.2f} G codes/s"
                            f" per thread at the minimum",
                            flush=True,
                        )
    finally:
        moequant.set_num_threads(saved)


if __name__ == "__main__":
    main()
