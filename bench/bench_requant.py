"""Requantization speed: moequant.requantize_int4 vs the MLX-native path
(mx.dequantize to float32, then mx.quantize), side by side in one run.

Kimi expert matrices (gate/up 2048 x 7168, down 7168 x 2048), INT4 g32 bf16 scales ->
3/4/6-bit g64. Prints ms, input GB/s (packed words + scales), the speedup, and the
fraction of the read bandwidth measured in this same run with the same thread count.

    python bench/bench_requant.py [--repeat 5] [--threads 1 2] [--device gpu]

Then the mse fit (``requantize_int4(fit="mse")``) side by side with min-max and the MLX
path on the same shapes: ns per group per core, input GB/s, the projection for Kimi's
whole expert set (KIMI_GROUPS g64 groups) in core-hours, and the squared-error ratio
against min-max. ``--metal`` adds the Metal fit kernel's device bytes per group measured
on the emulator and a *predicted* GPU time (no Metal here; see --help).
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
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="timed runs per case, the best one reported (default: %(default)s)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, os.cpu_count() or 1],
        help="thread counts to run (default: 1 and all cores)",
    )
    ap.add_argument(
        "--bits", type=int, nargs="+", default=[3, 4, 6], help="output bit widths (default: 3 4 6)"
    )
    ap.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="where both paths run (gpu: Metal, macOS only; --threads then only "
        "sizes the CPU bandwidth probe)",
    )
    ap.add_argument(
        "--fit-bits",
        type=int,
        nargs="+",
        default=[3, 4],
        help="bit widths of the mse-fit table (default: 3 4; none: --fit-bits 0)",
    )
    ap.add_argument(
        "--error-table",
        action="store_true",
        help="print only the mse fit's squared-error table (generators of "
        "moequant.testing.fit_reference, 512 x 2048 each) and exit",
    )
    ap.add_argument(
        "--error-ceiling",
        action="store_true",
        help="print the fit's error next to a dense search's (the best affine fit "
        "of the format, numerically) on the Gaussian/Laplace code generators "
        "and exit",
    )
    ap.add_argument(
        "--metal",
        action="store_true",
        help="also run the Metal fit kernel on the emulator (bytes per group) and print a predicted GPU time",
    )
    return ap


# Kimi-K2's routed experts: 60 MoE layers x 384 experts x 3 matrices of 2048 x 7168,
# in groups of 64.
KIMI_GROUPS = 60 * 384 * 3 * 2048 * 7168 // 64


def fit_table(args, data):
    """The mse fit vs min-max vs the MLX path, per shape, bits and thread count."""
    from moequant.testing import fit_reference as fr  # noqa: F401  (documents the fit)

    header = (
        f"{'shape':>11} {'bits':>4} {'thr':>3} {'mlx ms':>8} {'minmax ms':>9} "
        f"{'mse ms':>8} {'mse ns/grp/core':>15} {'cpu ns/grp':>10} {'mse MB/s':>8} "
        f"{'Kimi core-h':>11} {'err mse/mm':>10}"
    )
    print()
    print(f"mse fit (path: {moequant.ops._ext.fit_path()})")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for threads in args.threads:
        moequant.set_num_threads(threads)
        for (rows, K), (packed, scales) in data.items():
            in_bytes = packed.nbytes + scales.nbytes
            groups = rows * K // 64
            s32 = scales.astype(mx.float32)
            for bits in args.fit_bits:

                def mlx_path():
                    w = mx.dequantize(
                        packed.view(mx.uint32), s32, -8 * s32, group_size=32, bits=4, stream=mx.cpu
                    )
                    mx.eval(mx.quantize(w, group_size=64, bits=bits, stream=mx.cpu))

                def minmax():
                    mx.eval(moequant.requantize_int4(packed, scales, bits=bits, group_size=64))

                def mse():
                    mx.eval(moequant.requantize_int4(packed, scales, bits=bits, group_size=64, fit="mse"))

                t_mlx = best_time(mlx_path, 1)
                t_mm = best_time(minmax, args.repeat)
                c0 = time.process_time()
                t_ms = best_time(mse, max(1, args.repeat // 2))
                # CPU seconds of all threads per run (warm-up included): less sensitive
                # than wall time to other processes on a shared machine.
                cpu = (time.process_time() - c0) / (1 + max(1, args.repeat // 2))
                ns = t_ms * threads / groups * 1e9
                worst = max(worst, ns)
                w = mx.dequantize(packed.view(mx.uint32), s32, -8 * s32, group_size=32, bits=4)
                errs = []
                for fit in ("minmax", "mse"):
                    o = moequant.requantize_int4(packed, scales, bits=bits, group_size=64, fit=fit)
                    d = mx.dequantize(*o, group_size=64, bits=bits).astype(mx.float32)
                    errs.append(mx.sum(mx.square(w - d)).item())
                print(
                    f"{rows:>5}x{K:<5} {bits:>4} {threads:>3} {t_mlx * 1e3:>8.1f} "
                    f"{t_mm * 1e3:>9.2f} {t_ms * 1e3:>8.1f} {ns:>15.0f} {cpu / groups * 1e9:>10.0f} "
                    f"{in_bytes / t_ms / 1e6:>8.1f} {KIMI_GROUPS * ns * 1e-9 / 3600:>11.2f} "
                    f"{errs[1] / errs[0]:>10.3f}"
                )
    moequant.set_num_threads(0)
    print(
        f"ns/grp/core: best wall time x threads / groups (g64); cpu ns/grp: process CPU "
        f"time per group (mean over the runs); MB/s: INT4 input (words + scales) per wall "
        f"second; Kimi core-h: {KIMI_GROUPS:.3g} groups x ns/grp/core; err: squared weight "
        f"error of mx.dequantize(output) vs the INT4 weights, mse over min-max. "
        f"Worst ns/grp/core above: {worst:.0f}."
    )


# Figures of the *prediction* (not measured: no Metal here). An M2 Ultra-class GPU:
# ~27 TFLOPS float32 peak, ~800 GB/s. The fit kernel runs one thread per group with
# ~3.7 KB of per-thread arrays (register spills) and data-dependent loops, so the
# compute figure is an optimistic bound: it assumes 10% of peak.
GPU_FLOPS = 27e12 * 0.10
GPU_BW = 800e9


def fit_ops_per_group(n_slots):
    """float ops of one g64 group from the algorithm (metal/requantize_fit.h): the
    candidate grid (MQ_FIT_NCAND x slots x 11 ops), Lloyd (STARTS x up to LLOYD_CAP rounds x
    slots x 11 + solves), 1 + PAIRS exact errors (slots x 12) and the min-max pass."""
    from moequant.testing import fit_reference as fr

    ncand, starts, cap = fr.GRID * fr.GRID, fr.STARTS, fr.LLOYD_CAP
    return (
        ncand * (n_slots * 11 + 20)
        + starts * cap * (n_slots * 11 + 20)
        + (1 + fr.PAIRS) * n_slots * 12
        + n_slots * 6
    )


def metal_table(data):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from metal_emulator import MetalLibrary
    from metal_emulator import requantize_check as rq
    from metal_emulator import requantize_fit_check as fc

    lib = MetalLibrary(
        Path(__file__).resolve().parents[1] / "metal" / "requantize_fit.metal",
        only=["requantize_fit_int4_bfloat16_bfloat16"],
    )
    (rows, K), (packed, scales) = next(iter(data.items()))
    rows = 16  # a slice: the emulator runs GPU threads as fibers on one core
    p = np.array(packed[:rows].view(mx.uint32))
    sc = scales[:rows]
    print()
    print("Metal mse-fit kernel on the emulator (bytes measured; time is a PREDICTION)")
    for bits in (3, 4):
        _, _, _, res = fc.run_int4(
            lib, p, rq.to_numpy(sc), None, bits, 64, 32, "bfloat16", "bfloat16", count_unique=True
        )
        groups = rows * K // 64
        rd, wr = res.bytes_read / groups, res.bytes_written / groups
        ops = fit_ops_per_group(32)
        t = max(ops / GPU_FLOPS, (rd + wr) / GPU_BW)
        print(
            f"  {bits}-bit g64: {rd:.0f} B read + {wr:.0f} B written per group "
            f"(unique: {res.unique_bytes_read / groups:.0f} + "
            f"{res.unique_bytes_written / groups:.0f}); ~{ops} float ops per group; "
            f"PREDICTED {t * 1e9:.1f} ns/group -> Kimi experts in "
            f"{KIMI_GROUPS * t / 60:.1f} min (assumes {GPU_FLOPS / 1e12:.1f} TFLOPS "
            f"effective, {GPU_BW / 1e9:.0f} GB/s)"
        )


def error_table():
    """Squared weight error of the mse fit relative to min-max (mx.quantize's rule), per
    generator, bits and group size, with bf16 scales (1.0 = no gain)."""
    from moequant.testing import fit_reference as fr

    rng = np.random.default_rng(0)
    gens = {
        "flat codes, 10x spread": fr.kimi_like_int4(rng, 512, 2048, codes="flat"),
        "gaussian codes, 10x": fr.kimi_like_int4(rng, 512, 2048, codes="gaussian"),
        "laplace codes, 10x": fr.kimi_like_int4(rng, 512, 2048, codes="laplace"),
        "ct of gaussian W, 10x": fr.ct_gaussian_int4(rng, 512, 2048, spread=10.0),
        "ct of gaussian W, 1x": fr.ct_gaussian_int4(rng, 512, 2048, spread=1.0),
    }
    cols = [(b, g) for b in (2, 3, 4, 5, 6) for g in (64,)] + [(3, 32), (3, 128), (4, 32), (4, 128)]
    print(f"{'generator':<24}" + "".join(f"{f'{b}b g{g}':>9}" for b, g in cols))
    for name, (q, s) in gens.items():
        words = mx.array(moequant.int4.pack(q))
        scales = mx.array(s).astype(mx.bfloat16)
        s32 = scales.astype(mx.float32)
        w = mx.dequantize(words.view(mx.uint32), s32, -8 * s32, group_size=32, bits=4)
        row = f"{name:<24}"
        for b, g in cols:
            e = []
            for fit in ("minmax", "mse"):
                o = moequant.requantize_int4(words, scales, bits=b, group_size=g, fit=fit)
                d = mx.dequantize(*o, group_size=g, bits=b).astype(mx.float32)
                e.append(np.square(np.array(w, np.float64) - np.array(d, np.float64)).sum())
            row += f"{e[1] / e[0]:>9.3f}"
        print(row)


def error_ceiling():
    """How close the fit is to the best affine fit of this format: the same specification
    (fit_reference) with a 32 x 32 candidate grid of step 0.02 (a, b from -0.2, -0.18 at
    3 bits, to ~0.42), Lloyd from the best 8 for up to 10 rounds, against the fit as
    built, on the code generators whose 3-bit gain is below 30 % (64 x 2048 each; squared
    error over min-max's; numpy, ~1-2 min)."""
    from moequant.testing import fit_reference as fr

    dense = dict(GRID=32, GRID_STEP=np.float32(0.02), GRID_OFFSET=10, STARTS=8, LLOYD_CAP=10)
    built = {k: getattr(fr, k) for k in dense}
    rng = np.random.default_rng(0)
    print(f"{'generator':<20} {'bits':>4} {'as built':>9} {'dense search':>12}")
    for codes in ("gaussian", "laplace"):
        q, s = fr.kimi_like_int4(rng, 64, 2048, codes=codes)
        v, c, p = fr.int4_slots(q, s, 64, 32)
        for bits in (3, 4):
            row = []
            for consts in (built, dense):
                for k, x in consts.items():
                    setattr(fr, k, x)
                e = np.zeros(2)
                for i in range(0, len(v), 512):
                    _, _, _, e_mm, e_fit, _ = fr.fit_groups(
                        v[i : i + 512], c[i : i + 512], p[i : i + 512], bits, "bfloat16"
                    )
                    e += [e_mm.astype(np.float64).sum(), e_fit.astype(np.float64).sum()]
                row.append(e[1] / e[0])
            for k, x in built.items():
                setattr(fr, k, x)
            print(f"{codes + ' codes, 10x':<20} {bits:>4} {row[0]:>9.4f} {row[1]:>12.4f}")


def main():
    args = build_parser().parse_args()
    if args.error_table:
        error_table()
        return
    if args.error_ceiling:
        error_ceiling()
        return
    if args.device == "gpu" and not moequant.metal_available():
        print(f"bench_requant.py: --device gpu: {moequant.metal_status()[1]}", file=sys.stderr)
        raise SystemExit(2)
    dev = mx.gpu if args.device == "gpu" else mx.cpu

    print(
        f"device {args.device}; machine: {platform.machine()}, {os.cpu_count()} cores; mlx {mx.__version__}"
    )
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
                        packed.view(mx.uint32),
                        s32,
                        -8 * s32,
                        group_size=32,
                        bits=4,
                        stream=dev,
                    )
                    mx.eval(mx.quantize(w, group_size=64, bits=bits, stream=dev))

                def ours():
                    mx.eval(moequant.requantize_int4(packed, scales, bits=bits, group_size=64, stream=dev))

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
    if any(args.fit_bits):
        args.fit_bits = [b for b in args.fit_bits if b]
        fit_table(args, data)
    if args.metal:
        metal_table(data)


if __name__ == "__main__":
    main()
