"""`moequant demo`: requantize a generated Kimi-shaped INT4 expert matrix and compare
with the MLX path (dequantize to float32, then mx.quantize)."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from . import int4
from .ops import get_num_threads, requantize_int4


def add_arguments(p):
    p.add_argument("--rows", type=int, default=2048, help="Output features (default 2048).")
    p.add_argument("--cols", type=int, default=7168, help="Input features K (default 7168).")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4, 6], help="Target bits.")
    p.add_argument("--group-size", type=int, default=64, help="Target group size.")
    p.add_argument("--seed", type=int, default=0)


def _best_of(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(args) -> int:
    from .cli import UserError

    if args.rows <= 0 or args.cols <= 0 or args.cols % 128:
        raise UserError("--rows must be positive and --cols a positive multiple of 128")
    rng = np.random.default_rng(args.seed)
    w = rng.standard_normal((args.rows, args.cols)).astype(np.float32) * 0.02
    words, s = int4.quantize_symmetric(w, 32)
    packed = mx.array(words)
    scales = mx.array(s).astype(mx.bfloat16)
    w_exact = mx.array(int4.dequantize(words, np.array(scales.astype(mx.float32)), 32))
    mb = packed.nbytes / 1e6 + scales.nbytes / 1e6
    print(
        f"INT4 g32 matrix {args.rows} x {args.cols} ({mb:.1f} MB packed), "
        f"{get_num_threads()} threads"
    )
    print(f"{'bits':>4} {'mismatch':>9} {'rel.err':>9} {'ours ms':>9} {'mlx ms':>9} {'speedup':>8}")
    failed = False
    for bits in args.bits:
        ours = requantize_int4(packed, scales, bits=bits, group_size=args.group_size)
        mx.eval(ours)
        ref = mx.quantize(w_exact, group_size=args.group_size, bits=bits, stream=mx.cpu)
        ref = (ref[0], ref[1].astype(mx.bfloat16), ref[2].astype(mx.bfloat16))
        mism = sum(int(mx.sum(a != b).item()) for a, b in zip(ours, ref))
        failed |= mism != 0
        w_hat = mx.dequantize(*ours, group_size=args.group_size, bits=bits, dtype=mx.float32)
        rel = float(mx.sqrt(mx.sum((w_hat - w_exact) ** 2) / mx.sum(w_exact**2)).item())

        t_ours = _best_of(
            lambda: mx.eval(requantize_int4(packed, scales, bits=bits, group_size=args.group_size))
        )

        def mlx_path():
            wd = mx.dequantize(
                packed.view(mx.uint32), scales, -8 * scales, group_size=32, bits=4,
                dtype=mx.float32,
            )
            mx.eval(mx.quantize(wd, group_size=args.group_size, bits=bits))

        t_mlx = _best_of(mlx_path, repeat=1)
        print(
            f"{bits:>4} {mism:>9} {rel:>9.4f} {t_ours * 1e3:>9.1f} {t_mlx * 1e3:>9.1f} "
            f"{t_mlx / t_ours:>7.1f}x"
        )
    print("mismatch: words+scales+biases differing from mx.quantize of the exact dequantization")
    return 1 if failed else 0
