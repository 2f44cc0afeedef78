"""Requantization speed: moequant.requantize_int4 vs the MLX-native path
(mx.dequantize to float32, then mx.quantize), side by side in one run.

Kimi expert matrices (gate/up 2048 x 7168, down 7168 x 2048), INT4 g32 bf16 scales ->
3/4/6-bit g64. Prints ms, input GB/s (packed words + scales), the speedup, and the
fraction of the read bandwidth measured in this same run with the same thread count.

    python bench/bench_requant.py [--repeat 5] [--threads 1 2] [--device gpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import mlx.core as mx
import numpy as np

import moequant
from bandwidth import read_bandwidth
from moequant.testing.tiny_checkpoint import bf16_round, ct_quantize


def best_time(fn, repeat):
    fn()  # warm-up: first-touch allocation, thread start
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5,
                    help="timed runs per case, the best one reported (default: %(default)s)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="thread counts to run (default: 1 and all cores)")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 6],
                    help="output bit widths (default: 3 4 6)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="where both paths run (gpu: Metal, macOS only; --threads then only "
                    "sizes the CPU bandwidth probe)")
    return ap


def main():
    args = build_parser().parse_args()
    if args.device == "gpu" and not moequant.metal_available():
        print(f"bench_requant.py: --device gpu: {moequant.metal_status()[1]}", file=sys.stderr)
        raise SystemExit(2)
    dev = mx.gpu if args.device == "gpu" else mx.cpu

    print(f"device {args.device}; machine: {platform.machine()}, {os.cpu_count()} cores; "
          f"mlx {mx.__version__}")
    rng = np.random.default_rng(0)
    shapes = [(2048, 7168), (7168, 2048)]
    data = {}
    for rows, K in shapes:
        words, s = ct_quantize(bf16_round(rng.standard_normal((rows, K), np.float32) * 0.02), 32)
        packed = mx.array(words)
        scales = mx.array(s).astype(mx.bfloat16)
        data[(rows, K)] = (packed, scales)

    header = (
        f"{'shape':>11} {'bits':>4} {'thr':>3} {'mlx ms':>8} {'ours ms':>8} {'speedup':>8} "
        f"{'ours GB/s':>9} {'read GB/s':>9} {'of bw':>6}"
    )
    print(header)
    print("-" * len(header))
    for threads in args.threads:
        moequant.set_num_threads(threads)
        bw = read_bandwidth(1.0, threads)
        for (rows, K), (packed, scales) in data.items():
            in_bytes = packed.nbytes + scales.nbytes
            s32 = scales.astype(mx.float32)
            for bits in args.bits:
                def mlx_path():
                    # Exact dequantization (float32 scale and bias = -8 * scale).
                    w = mx.dequantize(
                        packed.view(mx.uint32), s32, -8 * s32, group_size=32, bits=4,
                        stream=dev,
                    )
                    mx.eval(mx.quantize(w, group_size=64, bits=bits, stream=dev))

                def ours():
                    mx.eval(moequant.requantize_int4(packed, scales, bits=bits, group_size=64,
                                                     stream=dev))

                t_mlx = best_time(mlx_path, max(1, args.repeat // 2))
                t_ours = best_time(ours, args.repeat)
                gbs = in_bytes / t_ours / 1e9
                print(
                    f"{rows:>5}x{K:<5} {bits:>4} {threads:>3} {t_mlx * 1e3:>8.1f} "
                    f"{t_ours * 1e3:>8.2f} {t_mlx / t_ours:>7.1f}x {gbs:>9.2f} {bw:>9.2f} "
                    f"{gbs / bw:>6.0%}"
                )
    moequant.set_num_threads(0)
    print(
        "mlx: mx.dequantize(float32) + mx.quantize on the CPU stream (MLX's CPU quantize is\n"
        "single-threaded whatever 'thr' says); ours: requantize_int4 on 'thr' threads;\n"
        "read GB/s: best of 5 threaded numpy sums of 1 GiB on 'thr' threads (bench/bandwidth.py)."
    )


if __name__ == "__main__":
    main()
