"""One decode step of one MLA layer's attention, Kimi-K2.5's head layout (64 heads,
latent 512 + rope 64), at 4K / 32K / 128K cached tokens: mlx-lm's path on the fp16/bf16
latent cache (the rope scores as an additive mask of mx.fast.scaled_dot_product_attention
on the absorbed query, as DeepseekV3Attention does at L = 1) against
moequant.mla_decode_attention on the 8-bit and 4-bit caches (kv_cache.MLAQuantizedKVCache's
layout, bf16 scales and biases, group 64), side by side in one run, with the read
bandwidth (bench/bandwidth.py) and the FMA peak measured in the same run.

    python bench/bench_kv.py [--contexts 4096 32768 131072] [--dtype bfloat16] [--steps 7]
                             [--heads 64] [--mlx-ops] [--threads N]

Reported per row: median wall ms per step (after one warm-up step), the speed-up over the 16-bit
path, the cache bytes read per step and their rate as a fraction of the bandwidth probe,
and GFLOP/s of the step (4 H R + 2 H DR flops per cached token) as a fraction of the FMA
peak: with 64 heads sharing each cached row the step does ~230 flops per cached byte at
8 bits, so on a CPU it is bound by arithmetic, not by reading the cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

import moequant
from bandwidth import read_bandwidth
from moequant import _ext
from moequant.kv_cache import bytes_per_token

R, DR, GROUP = 512, 64, 64


def time_step(fn, steps, single_call_s=10.0):
    """Median seconds of ``steps`` calls after one warm-up call; a warm-up call longer
    than ``single_call_s`` is the figure itself (1 call; marked * in the table)."""
    t = time.perf_counter()
    mx.eval(fn())
    first = time.perf_counter() - t
    if first > single_call_s:
        return first, 1
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), steps


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[4096, 32768, 131072],
        help="cached tokens per row (default: %(default)s)",
    )
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        default="bfloat16",
        help="the model's dtype: the 16-bit cache, the queries, the quantized cache's "
        "scales and biases (default: %(default)s, Kimi's)",
    )
    ap.add_argument("--heads", type=int, default=64, help="attention heads (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per row, median (default: %(default)s)")
    ap.add_argument(
        "--mlx-ops",
        action="store_true",
        help="also time the step composed from mx.quantized_matmul on the quantized cache",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="moequant's CPU threads (default: MOEQUANT_NUM_THREADS or all cores)",
    )
    return ap


def main(a) -> None:
    if a.threads:
        moequant.set_num_threads(a.threads)
    dt = getattr(mx, a.dtype)
    H = a.heads
    bw = read_bandwidth()
    peak = _ext.fma_peak_gflops()
    print(
        f"# {H} heads, latent {R} + rope {DR}, {a.dtype}; threads {moequant.get_num_threads()}, "
        f"kernel {moequant.mla_cpu_path()}; read bandwidth {bw:.2f} GB/s, FMA peak {peak:.1f} GFLOP/s"
    )
    print(
        f"{'tokens':>8} {'path':<22} {'ms':>9} {'vs 16-bit':>9} {'cache MB':>9} {'GB/s':>7} "
        f"{'of bw':>6} {'GFLOP/s':>8} {'of peak':>7}"
    )
    rng = np.random.default_rng(0)
    scale = (128 + 64) ** -0.5
    results = []
    for T in a.contexts:
        lat = mx.array(rng.standard_normal((1, 1, T, R)).astype(np.float32)).astype(dt)
        pe = mx.array(rng.standard_normal((1, 1, T, DR)).astype(np.float32)).astype(dt)
        q_lat = (mx.array(rng.standard_normal((1, H, 1, R)).astype(np.float32)) * 0.05).astype(dt)
        q_pe = (mx.array(rng.standard_normal((1, H, 1, DR)).astype(np.float32)) * 0.05).astype(dt)
        mx.eval(lat, pe, q_lat, q_pe)
        flops = T * H * (4 * R + 2 * DR)

        def mlx_lm_step():
            pe_scores = (q_pe * scale) @ pe.swapaxes(-1, -2)
            return mx.fast.scaled_dot_product_attention(q_lat, lat, lat, scale=scale, mask=pe_scores)

        rows = [("mlx-lm 16-bit", mlx_lm_step, T * bytes_per_token(R, DR))]
        for bits in (8, 4):
            ql = mx.quantize(lat, group_size=GROUP, bits=bits)
            qp = mx.quantize(pe, group_size=GROUP, bits=bits)
            mx.eval(ql, qp)

            def ours(ql=ql, qp=qp, bits=bits):
                return moequant.mla_decode_attention(
                    q_lat[:, :, 0], q_pe[:, :, 0], ql, qp, scale=scale, bits=bits, group_size=GROUP
                )

            nb = T * bytes_per_token(R, DR, bits, GROUP)

            def mlx_ops(ql=ql, qp=qp, bits=bits):
                # The same step from MLX's own quantized_matmul (reads the cache twice).
                kw = dict(group_size=GROUP, bits=bits)
                s = mx.quantized_matmul(q_lat[0, :, 0], *(a[0, 0] for a in ql), transpose=True, **kw)
                s = s + mx.quantized_matmul(q_pe[0, :, 0], *(a[0, 0] for a in qp), transpose=True, **kw)
                p = mx.softmax((s * scale).astype(mx.float32), axis=-1, precise=True).astype(dt)
                return mx.quantized_matmul(p, *(a[0, 0] for a in ql), transpose=False, **kw)

            rows.append((f"moequant {bits}-bit g{GROUP}", ours, nb))
            if a.mlx_ops:
                rows.append((f"mx.quantized_matmul {bits}b", mlx_ops, nb))
        base = None
        for name, fn, nbytes in rows:
            s, n = time_step(fn, a.steps)
            base = base or s
            gbs = nbytes / s / 1e9
            gfl = flops / s / 1e9
            results.append((T, name, s))
            print(
                f"{T:>8} {name:<22} {s * 1e3:>9.2f}{'*' if n == 1 else ' '}{base / s:>8.2f}x {nbytes / 1e6:>9.1f} {gbs:>7.2f} "
                f"{gbs / bw:>6.1%} {gfl:>8.1f} {gfl / peak:>7.1%}",
                flush=True,
            )
        del lat, pe
    bw2 = read_bandwidth()
    print(f"# after: read bandwidth {bw2:.2f} GB/s; * one call (the warm-up took over 10 s)")


if __name__ == "__main__":
    main(build_parser().parse_args())
