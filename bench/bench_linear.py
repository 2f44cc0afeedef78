"""Benchmark of moequant.quantized_linear against mx.quantized_matmul on the CPU.

Kimi-K2 (DeepSeek-V3) attention and dense-layer shapes, affine 4/6/8-bit g64, at decode
(GEMV: 1 row of x; float32 and bfloat16 activations) and for batches (GEMM: 64 and 256
rows, prefill / eval), ours versus MLX's own kernel on the same weights in the same run.
Decode rows are reported as GB/s of weights (codes + scales + biases) against the read
bandwidth probe (bench/bandwidth.py); batch rows as GFLOP/s against an FMA-peak probe
(independent 8-lane FMA chains on every thread, moequant._ext.fma_peak_gflops). Both
probes run in this run, before and after the kernels; the fractions use the higher.

    python bench/bench_linear.py [--bits 4 6 8] [--shapes q_a kv_a ...] [--gemm-rows 64 256]
                                 [--steps 7] [--lm-head] [--quick] [--no-huge-pages]
    python bench/bench_linear.py --kernel-rate [--bits 2 3 4 6 8]

--kernel-rate measures what the decode row kernels compute rather than what memory
delivers: one thread, a 2048 x 2048 g64 matrix that stays in cache, the fastest of many
calls (robust on a shared machine: a call of a few hundred microseconds usually runs
uninterrupted), for each SIMD row-kernel path this CPU has (MOEQUANT_CPU_PATH), in G
codes/s per core; and the fraction of the read bandwidth probe that rate would fill on
every thread of the pool if memory kept up (an upper bound of the decode rows above).

The wall time is the median of --steps calls after warm-up calls; "cpu" is the median
process CPU time per call divided by the thread count (what the call would take on an
idle machine when the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

import mlx.core as mx
import numpy as np

import moequant
from bandwidth import read_bandwidth
from moequant import _ext

# name: (N, K) = (output features, input features) of one Kimi-K2 projection.
SHAPES = {
    "q_a": (1536, 7168),  # q_a_proj
    "q_b": (12288, 1536),  # q_b_proj, 64 heads x 192
    "kv_a": (576, 7168),  # kv_a_proj_with_mqa, 512 + 64
    "o_proj": (7168, 8192),  # 64 heads x 128 -> hidden
    "dense_up": (18432, 7168),  # dense MLP gate_proj / up_proj (layers 0-2)
    "dense_down": (7168, 18432),  # dense MLP down_proj
    "shared_up": (2048, 7168),  # shared expert gate_proj / up_proj
    "shared_down": (7168, 2048),  # shared expert down_proj
}
LM_HEAD = (163840, 7168)
GROUP = 64


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_calls(fn, steps, warmup):
    """Median wall seconds and median process CPU seconds per call."""
    ts, cs = [], []
    for s in range(warmup + steps):
        c = cpu_seconds()
        t = time.perf_counter()
        mx.eval(fn())
        if s >= warmup:
            ts.append(time.perf_counter() - t)
            cs.append(cpu_seconds() - c)
    return statistics.median(ts), statistics.median(cs)


def make_weight(N, K, bits, huge_pages):
    # Random codes and bf16 scales/biases of a realistic magnitude, as a quantized
    # checkpoint holds them (quantizing an N x K float matrix would dominate the run).
    rng = np.random.default_rng(N * 31 + K + bits)
    words = rng.integers(0, 2**32, size=(N, K * bits // 32), dtype=np.uint64).astype(np.uint32)
    w = mx.array(words)
    s = mx.array((rng.random((N, K // GROUP), dtype=np.float32) * 0.002 + 0.001)).astype(mx.bfloat16)
    b = mx.array(-(2 ** (bits - 1)) * np.array(s.astype(mx.float32))).astype(mx.bfloat16)
    mx.eval(w, s, b)
    if huge_pages:
        moequant.huge_pages([w, s, b], min_bytes=1 << 20)
    return w, s, b


def row_rate(bits, dtype, calls=60, N=2048, K=2048):
    """G codes/s per core of the decode row kernel this path picks for `bits` and x of
    `dtype`: one thread, an N x K g64 matrix that stays in cache, the fastest of `calls`."""
    w, s, b = make_weight(N, K, bits, False)
    x = mx.array(np.random.default_rng(bits).standard_normal((1, K)).astype(np.float32)).astype(dtype)
    mx.eval(x)
    saved = moequant.get_num_threads()
    moequant.set_num_threads(1)
    try:
        fastest = min(
            time_calls(lambda: moequant.quantized_linear(x, w, s, b, bits=bits, group_size=GROUP), 1, 1)[0]
            for _ in range(calls)
        )
    finally:
        moequant.set_num_threads(saved)
    return N * K / fastest / 1e9


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8], help="bit widths (default: 4 6 8)")
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=list(SHAPES),
        choices=list(SHAPES),
        help="Kimi projections to run (default: all)",
    )
    ap.add_argument(
        "--gemm-rows",
        type=int,
        nargs="*",
        default=[64, 256],
        help="batch sizes of the GEMM rows (default: 64 256; none for decode only)",
    )
    ap.add_argument(
        "--gemv-rows",
        type=int,
        nargs="*",
        default=[1],
        help="decode row counts, each at float32 and bfloat16 (default: 1)",
    )
    ap.add_argument(
        "--mlx-gemm-rows",
        type=int,
        default=64,
        help="largest batch timed for mx.quantized_matmul (it runs at ~2 GFLOP/s on CPUs; default: 64)",
    )
    ap.add_argument("--steps", type=int, default=7, help="timed calls of ours per row (default: 7)")
    ap.add_argument("--mlx-steps", type=int, default=2, help="timed calls of MLX's (default: 2)")
    ap.add_argument(
        "--lm-head", action="store_true", help="also the 163840 x 7168 lm_head (about 1 GB at 6 bits)"
    )
    ap.add_argument("--quick", action="store_true", help="q_a, o_proj and dense_up at 6 bits only")
    ap.add_argument(
        "--kernel-rate",
        action="store_true",
        help="only the row kernels' compute rate per path (cache-resident, one thread)",
    )
    ap.add_argument(
        "--ref-bandwidth",
        type=float,
        default=None,
        help="GB/s the --kernel-rate fractions refer to (default: this run's probe; "
        "on a loaded machine the probe reads low, give a quiet run's figure)",
    )
    ap.add_argument(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_false",
        help="leave the weights on the pages MLX allocated (the bandwidth probe reads huge pages)",
    )
    return ap


# moequant.moe_cpu_path() values in order; a CPU runs every path up to its best.
CPU_PATHS = ["scalar", "avx2", "avx2int", "avx512", "avx512vnni"]


def kernel_rate(args, bw, threads):
    N = K = 2048
    best = moequant.moe_cpu_path()
    paths = [p for p in CPU_PATHS[1 : CPU_PATHS.index(best) + 1]]
    saved_env, saved_threads = os.environ.get("MOEQUANT_CPU_PATH"), moequant.get_num_threads()
    moequant.set_num_threads(1)
    print(
        f"# row-kernel compute rate: {N} x {K} g{GROUP}, 1 thread, fastest of 60 calls, G codes/s per"
        f" core; in brackets the fraction of {bw:.2f} GB/s it would fill on {threads} threads",
        flush=True,
    )
    try:
        for bits in args.bits:
            w, s, b = make_weight(N, K, bits, False)
            code_bytes = (w.nbytes + s.nbytes + b.nbytes) / (N * K)
            cells = []
            for dt in (mx.float32, mx.bfloat16):
                x = mx.array(np.random.default_rng(bits).standard_normal((1, K)).astype(np.float32)).astype(
                    dt
                )
                mx.eval(x)
                # The paths take turns call by call, in alternating order: on a host whose
                # speed drifts, timing one path after the other biased the comparison.
                fastest = dict.fromkeys(paths, float("inf"))
                for rep in range(60):
                    for path in paths if rep % 2 else paths[::-1]:
                        os.environ["MOEQUANT_CPU_PATH"] = path
                        fastest[path] = min(
                            fastest[path],
                            time_calls(
                                lambda: moequant.quantized_linear(x, w, s, b, bits=bits, group_size=GROUP),
                                1,
                                1,
                            )[0],
                        )
                for path in paths:
                    rate = N * K / fastest[path] / 1e9
                    cells.append(
                        f"x={'bf16' if dt == mx.bfloat16 else 'f32':<4} {path:>8} {rate:5.2f}"
                        f" ({100 * rate * threads * code_bytes / bw:4.0f}%)"
                    )
            print(f"  {bits}-bit  " + "  ".join(cells), flush=True)
            del w, s, b
    finally:
        moequant.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("MOEQUANT_CPU_PATH", None)
        else:
            os.environ["MOEQUANT_CPU_PATH"] = saved_env


def main():
    args = build_parser().parse_args()
    if args.quick:
        args.shapes, args.bits = ["q_a", "o_proj", "dense_up"], [6]

    mx.set_default_device(mx.cpu)
    threads = moequant.get_num_threads()
    print(
        f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, moequant threads"
        f" {threads}, GEMV rows {moequant.moe_cpu_path()}, GEMM {moequant.qgemm_path()}, mlx {mx.__version__}",
        flush=True,
    )
    bw = read_bandwidth()
    peak = _ext.fma_peak_gflops(1.0)
    print(
        f"# read bandwidth {bw:.2f} GB/s (threaded numpy sum of 1 GiB, best of 5); FMA peak "
        f"{peak:.1f} GFLOP/s ({threads} threads)",
        flush=True,
    )
    if args.kernel_rate:
        kernel_rate(args, args.ref_bandwidth or bw, threads)
        return
    shapes = [(n, SHAPES[n]) for n in args.shapes] + ([("lm_head", LM_HEAD)] if args.lm_head else [])
    print(
        f"{'shape':>11} {'N x K':>13} {'b':>1} {'M':>4} {'x':>4} {'MB':>6} {'ours ms':>8} {'cpu ms':>7}"
        f" {'mlx ms':>9} {'speedup':>7} {'GB/s':>6} {'GFLOP/s':>7}  {'diff':>7}",
        flush=True,
    )
    rows = []
    for name, (N, K) in shapes:
        for bits in args.bits:
            w, s, b = make_weight(N, K, bits, args.huge_pages)
            nbytes = w.nbytes + s.nbytes + b.nbytes
            cases = [(m, dt) for m in args.gemv_rows for dt in (mx.float32, mx.bfloat16)]
            cases += [(m, mx.float32) for m in args.gemm_rows]
            for M, dt in cases:
                x = mx.array(np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)).astype(dt)
                mx.eval(x)

                def ours():
                    return moequant.quantized_linear(x, w, s, b, bits=bits, group_size=GROUP)

                def ref():
                    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=GROUP, bits=bits)

                t, c = time_calls(ours, args.steps, 2)
                if M <= args.mlx_gemm_rows:
                    tm, _ = time_calls(ref, args.mlx_steps, 1 if M <= 4 else 0)
                    yo = np.array(ours().astype(mx.float32))
                    yr = np.array(ref().astype(mx.float32))
                    diff = float(np.abs(yo - yr).max() / max(np.abs(yr).max(), 1e-30))
                else:
                    tm, diff = float("nan"), float("nan")
                gbs = nbytes / t / 1e9
                gfl = 2.0 * M * N * K / t / 1e9
                r = dict(
                    name=name,
                    N=N,
                    K=K,
                    bits=bits,
                    M=M,
                    x="bf16" if dt == mx.bfloat16 else "f32",
                    mb=nbytes / 1e6,
                    t=t,
                    c=c / threads,
                    tm=tm,
                    gbs=gbs,
                    gfl=gfl,
                    diff=diff,
                )
                rows.append(r)
                print(
                    f"{name:>11} {N:>6}x{K:<6} {bits} {M:>4} {r['x']:>4} {r['mb']:6.1f} {t * 1e3:8.2f}"
                    f" {r['c'] * 1e3:7.2f} {tm * 1e3:9.2f} {tm / t:6.1f}x {gbs:6.2f} {gfl:7.1f}  {diff:7.1e}",
                    flush=True,
                )
            del w, s, b
    bw2 = read_bandwidth()
    peak2 = _ext.fma_peak_gflops(1.0)
    top, ptop = max(bw, bw2), max(peak, peak2)
    print(f"# after: read bandwidth {bw2:.2f} GB/s, FMA peak {peak2:.1f} GFLOP/s", flush=True)
    print(
        f"# decode rows (M <= 4) as a fraction of the higher bandwidth probe ({top:.2f} GB/s), batch rows"
        f" of the higher FMA peak ({ptop:.1f} GFLOP/s); by cpu time in brackets:",
        flush=True,
    )
    for r in rows:
        if r["M"] <= 4:
            frac = f"{r['gbs']:6.2f} GB/s = {100 * r['gbs'] / top:4.0f}% of bw ({100 * r['mb'] / 1e3 / r['c'] / top:4.0f}%)"
        elif ptop > 0:
            frac = (
                f"{r['gfl']:6.1f} GFLOP/s = {100 * r['gfl'] / ptop:4.0f}% of FMA peak"
                f" ({100 * 2 * r['M'] * r['N'] * r['K'] / r['c'] / 1e9 / ptop:4.0f}%)"
            )
        else:  # no AVX2 (MOEQUANT_CPU_PATH=scalar): the probe has no portable loop
            frac = f"{r['gfl']:6.1f} GFLOP/s (no FMA-peak probe on this path)"
        print(f"  {r['name']:>11} {r['bits']}-bit M {r['M']:>4} x={r['x']:<4} {frac}", flush=True)


if __name__ == "__main__":
    main()
