"""Conversion speed and peak memory: `moequant convert` vs mlx-lm's own route on the same
fixture with real Kimi expert dimensions (hidden 7168, moe_intermediate 2048).

mlx-lm's route, the way to convert such a checkpoint with mlx-lm alone (it cannot
load compressed-tensors INT4 into a quantized model directly): lazy ``load_model`` -> ``dequantize_model`` -> drop the quantization configs ->
``quantize_model`` with the same per-module bits as our recipe -> ``save_model``.
Each route runs in a fresh process; peak memory is the process's VmHWM (Linux) or
ru_maxrss. Input GB/s = source safetensors bytes / wall time.

    python bench/bench_convert.py [--experts 16] [--layers 4] [--recipe alis-3.6]

With ``--full-dims`` it converts a full-dimension 2-layer Kimi checkpoint instead (every
dimension Kimi's except the vocabulary: 384 experts of 7168x2048, 64 heads, dense
intermediate 18432; layer 0 dense, layer 1 MoE; 10.8 GB) and puts the conversion next
to its I/O floor measured in the same run: reading the source files cold plus writing
and fsyncing as many bytes as the conversion writes, on the same file systems. "Cold"
without root: every source file is dropped from the page cache with
posix_fadvise(POSIX_FADV_DONTNEED) before each measured read, and the bytes still
resident afterwards are counted (mincore) and printed. The disk's speed drifts by 2-3x
from one minute to the next, so the floor is sampled ``--rounds + 1`` times, before,
between and after the timed conversions; the ratio is printed against the best read +
best write of all samples (the strictest) and against each sample. ``--baseline DIR``
times another moequant package (e.g. a copy of main's) in the same rounds. mlx-lm's
route is not run there (it would hold the whole dequantized model, ~40 GB).

    python bench/bench_convert.py --full-dims --workdir /tmp/benchfull [--fit mse] \
        [--rounds 2] [--source DIR] [--baseline DIR] [--concurrent-floor]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OURS = r"""
import json, resource, sys, time
from moequant.convert import convert
fit = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
cpu0 = CPU()
t0 = time.perf_counter()
r = convert(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, fit=fit)
wall = time.perf_counter() - t0
cpu = [b - a for a, b in zip(cpu0, CPU())] if cpu0 else []
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": wall, "out_bytes": r.total_bytes, "peak": PEAK(), "user": u.ru_utime,
                  "sys": u.ru_stime, "minflt": u.ru_minflt, "stages": r.stages, "machine": cpu}))
"""

MLX_LM = r"""
import json, sys, time
from pathlib import Path
import mlx.core as mx
from mlx_lm.utils import dequantize_model, load_model, quantize_model, save_config, save_model
src, dst, recipe = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
# The per-module bits our recipe picks, so both routes write the same format.
from moequant.plan import make_plan
plan = make_plan(src, recipe)
prefix = "language_model." if plan.cfg.prefix else ""
decisions = {prefix + p: d for p, d in plan.resolution.decisions.items()}
del plan, make_plan
t0 = time.perf_counter()
model, config = load_model(src, lazy=True)
model = dequantize_model(model)
config.pop("quantization", None)
config.pop("quantization_config", None)
config.get("text_config", {}).pop("quantization_config", None)
def predicate(path, module):
    d = decisions.get(path)
    return False if d is None else {"group_size": d.group_size, "bits": d.bits, "mode": "affine"}
model, config = quantize_model(model, config, 64, 4, quant_predicate=predicate)
save_model(dst, model, donate_model=True)
save_config(config, dst / "config.json")
wall = time.perf_counter() - t0
out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
print(json.dumps({"wall": wall, "out_bytes": out_bytes, "peak": PEAK()}))
"""

PEAK = r"""
def CPU():
    # The whole machine's CPU time by state (Linux /proc/stat, clock ticks): what the
    # other processes, the kernel and the hypervisor (steal) took during a conversion.
    try:
        return [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    except (OSError, ValueError):
        return []
def PEAK():
    try:
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""


CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def run_route(code, src, dst, recipe, *extra, pythonpath=None):
    env = None
    if pythonpath:  # another moequant tree (e.g. main's, for a before/after in one run)
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))
        )
    r = subprocess.run(
        [sys.executable, "-c", PEAK + code, str(src), str(dst), recipe, *extra],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode:
        sys.exit(f"route failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--experts",
        type=int,
        default=16,
        help="routed experts per MoE layer of the generated fixture (default: %(default)s)",
    )
    ap.add_argument(
        "--layers", type=int, default=4, help="decoder layers, layer 0 dense (default: %(default)s)"
    )
    ap.add_argument("--recipe", default="alis-3.6", help="recipe for both routes (default: %(default)s)")
    ap.add_argument(
        "--full-dims",
        action="store_true",
        help="convert a full-dimension 2-layer Kimi checkpoint (10.8 GB; needs ~20 GB "
        "of free disk) and compare with the I/O floor measured in the same run; "
        "--experts and --layers are ignored",
    )
    ap.add_argument(
        "--fit",
        choices=("minmax", "mse"),
        default=None,
        help="override the recipe's fit (--full-dims only; default: the recipe's)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="--full-dims: conversions to time; the floor is sampled before, between and "
        "after them (rounds + 1 samples; default: %(default)s)",
    )
    ap.add_argument(
        "--concurrent-floor",
        action="store_true",
        help="--full-dims: also time the cold read and the write at once in each floor sample",
    )
    ap.add_argument(
        "--baseline",
        default=None,
        help="--full-dims: a directory holding another moequant package (e.g. main's): "
        "its conversion is timed before ours in every round, on the same floor samples",
    )
    ap.add_argument(
        "--source",
        default=None,
        help="--full-dims: an existing fixture to convert (default: WORKDIR/src-full, "
        "generated when missing); outputs and the floor file still go to WORKDIR",
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help="where the fixture and both outputs go; an existing fixture there is "
        "reused (default: a new temporary directory)",
    )
    return ap


# Kimi-K2.5's text dimensions, except the vocabulary (163840 would add 4.7 GB of
# embeddings and head that say nothing about the expert path).
KIMI_DIMS = {
    "hidden_size": 7168,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 384,
    "num_experts_per_tok": 8,
    "intermediate_size": 18432,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "vocab_size": 1024,
}
CHUNK = 32 << 20


def drop_cache(paths) -> int:
    """Drop the files' pages from the page cache (no root needed: posix_fadvise
    DONTNEED on clean pages) and return how many bytes are still resident."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    sizes = [resident_bytes(p) for p in paths]
    return -1 if min(sizes) < 0 else sum(sizes)


def resident_bytes(path) -> int:
    """Bytes of ``path`` in the page cache, from util-linux's fincore (mincore); -1 when
    it is not installed."""
    try:
        r = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(r.stdout.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return -1


def cold_read_seconds(paths) -> float:
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def write_seconds(path, nbytes: int) -> float:
    """Write ``nbytes`` of incompressible bytes in CHUNK writes and fsync (a conversion
    fsyncs every shard before putting it in place)."""
    buf = os.urandom(CHUNK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[: min(left, CHUNK)])
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    os.unlink(path)
    return wall


def mb(n: int) -> str:
    return "unknown (no fincore)" if n < 0 else f"{n / 1e6:.0f} MB"


def concurrent_seconds(files, path, nbytes: int) -> float:
    """Read the source files cold while writing and fsyncing ``nbytes``, as a conversion
    does: the disk's floor for a perfectly overlapped conversion."""
    drop_cache(files)
    box = {}
    writer = threading.Thread(target=lambda: box.setdefault("w", write_seconds(path, nbytes)))
    t0 = time.perf_counter()
    writer.start()
    cold_read_seconds(files)
    writer.join()
    return time.perf_counter() - t0


def floor(files, work, out_bytes, concurrent=False):
    """One sample of the I/O floor: a cold read of the source, then a write + fsync of
    as many bytes as the conversion writes (and, asked, both at once)."""
    left = drop_cache(files)
    read = cold_read_seconds(files)
    drop_cache(files)
    write = write_seconds(work / "floor.bin", out_bytes)
    both = concurrent_seconds(files, work / "floor.bin", out_bytes) if concurrent else None
    return {"read": read, "write": write, "both": both, "resident_before_read": left}


def spread(xs) -> str:
    xs = sorted(xs)
    return f"min {xs[0]:.2f}, median {statistics.median(xs):.2f}, max {xs[-1]:.2f} s (max/min {xs[-1] / xs[0]:.2f})"


def main_full(args):
    from moequant import get_num_threads
    from moequant.checkpoint import Source
    from moequant.plan import make_plan
    from moequant.testing import make_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-full-"))
    src = Path(args.source) if args.source else work / "src-full"
    free = shutil.disk_usage(work).free
    print(
        f"free disk at {work}: {free / 1e9:.1f} GB; available memory: "
        f"{next(int(l.split()[1]) for l in open('/proc/meminfo') if l.startswith('MemAvailable')) / 1e6:.1f} GB"
    )
    if not (src / "config.json").exists():
        if args.source:
            sys.exit(f"--source {src}: no config.json")
        if free < 22e9:
            sys.exit(f"need ~22 GB free at {work} (fixture 10.8 GB + output ~8 GB + floor file)")
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        make_checkpoint(src, "kimi_k25", layers=2, shards=16, random_codes=True, text_overrides=KIMI_DIMS)
        print(f"fixture generated in {time.perf_counter() - t0:.1f} s")
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in files)
    source = Source.open(src)
    moe_layer = source.unit_input_bytes(source.units[1])
    plan = make_plan(src, args.recipe)
    out_bytes = sum(r.bytes for r in plan.rows)
    print(
        f"fixture: kimi_k25, 2 layers at Kimi's dims (vocab 1024), {in_bytes / 1e9:.2f} GB in "
        f"{len(files)} files; MoE layer source {moe_layer / 1e9:.2f} GB; recipe {args.recipe}"
        f"{' --fit ' + args.fit if args.fit else ''}, output {out_bytes / 1e9:.2f} GB"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs: timings "
        f"noisy), moequant threads {get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    routes = [("moequant convert", None)]
    if args.baseline:
        routes.insert(0, ("baseline convert", str(Path(args.baseline).resolve())))
    # The disk's speed drifts by 2-3x between minutes: floor samples are taken before,
    # between and after the conversions, and every ratio is shown against each of them.
    floors, runs = [], []
    dst = work / "out-full"

    def sample_floor():
        floors.append(floor(files, work, out_bytes, args.concurrent_floor))
        f = floors[-1]
        print(
            f"  floor sample {len(floors)}: cold read {f['read']:.2f} s, write + fsync {f['write']:.2f} s"
            + (f", both at once {f['both']:.2f} s" if f["both"] else "")
            + f" (resident before the read: {mb(f['resident_before_read'])})",
            flush=True,
        )

    sample_floor()
    for _ in range(args.rounds):
        for name, path in routes:
            shutil.rmtree(dst, ignore_errors=True)
            left = drop_cache(files)
            r = run_route(OURS, src, dst, args.recipe, args.fit or "-", pythonpath=path)
            shutil.rmtree(dst, ignore_errors=True)
            r.update(name=name, resident=left)
            runs.append(r)
            print(f"  {name}: {r['wall']:.2f} s (resident before: {mb(left)})", flush=True)
            sample_floor()

    print(f"\n{'measurement':<34} {'wall s':>8} {'GB/s':>7}")
    for i, f in enumerate(floors, 1):
        print(f"{f'floor {i}: cold read':<34} {f['read']:>8.2f} {in_bytes / f['read'] / 1e9:>7.2f}")
        print(f"{f'floor {i}: write + fsync':<34} {f['write']:>8.2f} {out_bytes / f['write'] / 1e9:>7.2f}")
        if f["both"]:
            print(f"{f'floor {i}: read and write at once':<34} {f['both']:>8.2f}")
    for r in runs:
        print(f"{r['name']:<34} {r['wall']:>8.2f} {in_bytes / r['wall'] / 1e9:>7.2f}")
    reads, writes = [f["read"] for f in floors], [f["write"] for f in floors]
    sums = [f["read"] + f["write"] for f in floors]
    print(f"\nfloor samples ({len(floors)}): cold read {spread(reads)}")
    print(f"{'':>{len(str(len(floors))) + 17}}write + fsync {spread(writes)}")
    print(f"{'':>{len(str(len(floors))) + 17}}read + write {spread(sums)}")
    if floors[0]["both"]:
        print(f"{'':>{len(str(len(floors))) + 17}}both at once {spread([f['both'] for f in floors])}")
    best = min(reads) + min(writes)
    for r in runs:
        st = r["stages"]
        print(
            f"\n{r['name']}: wall {r['wall']:.2f} s, user {r['user']:.1f} s, system {r['sys']:.1f} s, "
            f"{r['minflt'] / 1e6:.2f} M minor page faults, peak RSS {r['peak'] / 1e9:.2f} GB"
        )
        if r.get("machine"):
            m = r["machine"]
            print(
                "  machine CPU during it (all processes, both cores): "
                + ", ".join(f"{k} {v / max(sum(m), 1):.0%}" for k, v in zip(CPU_STATES, m))
            )
        print(
            f"  main thread: computing {st['compute']:.1f} s ({st['compute'] / r['wall']:.0%} of wall), "
            f"waiting for reads {st['wait_read']:.1f} s, waiting for writes {st['wait_write']:.1f} s"
        )
        parts = sorted((k for k in st if k.startswith("compute ")), key=lambda k: -st[k])
        print("  computing by job kind and fit: " + ", ".join(f"{k[8:]} {st[k]:.1f} s" for k in parts))
        ratios = [s / r["wall"] for s in sums]
        ratio = best / r["wall"]
        print(
            f"  I/O floor = best cold read + best write of the {len(floors)} samples = {best:.2f} s: "
            f"convert runs at {ratio:.0%} of it (target >= 60%: {'met' if ratio >= 0.6 else 'NOT met'}); "
            f"against each sample's read + write: {min(ratios):.0%} .. {max(ratios):.0%} "
            f"(median floor {statistics.median(sums) / r['wall']:.0%})"
        )
        fl_max = max(min(reads), min(writes))
        both = [f["both"] for f in floors if f["both"]]
        extra = f", against the best read and write at once: {min(both) / r['wall']:.0%}" if both else ""
        print(
            f"  against max(best read, best write) = {fl_max:.2f} s (perfect overlap of reading and "
            f"writing): {fl_max / r['wall']:.0%}{extra}"
        )
        rss_ok = r["peak"] <= 1.5 * moe_layer
        print(
            f"  peak RSS {r['peak'] / 1e9:.2f} GB = {r['peak'] / moe_layer:.2f}x one MoE layer's source "
            f"bytes (target <= 1.5x: {'met' if rss_ok else 'NOT met'})"
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def main():
    args = build_parser().parse_args()
    if args.full_dims:
        return main_full(args)

    from moequant import get_num_threads
    from moequant.testing import make_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    src = work / "src"
    if not (src / "config.json").exists():
        t0 = time.perf_counter()
        make_checkpoint(
            src,
            "kimi_k25",
            layers=args.layers,
            shards=4,
            random_codes=True,
            text_overrides={
                "hidden_size": 7168,
                "moe_intermediate_size": 2048,
                "n_routed_experts": args.experts,
                "num_experts_per_tok": 2,
                "intermediate_size": 2048,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "q_lora_rank": 512,
                "kv_lora_rank": 512,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
                "vocab_size": 1024,
            },
        )
        print(f"fixture generated in {time.perf_counter() - t0:.1f} s")
    in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(
        f"fixture: kimi_k25, {args.layers} layers, {args.experts} experts of 7168x2048, "
        f"{in_bytes / 1e9:.2f} GB of safetensors; recipe {args.recipe}"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"moequant threads {get_num_threads()}"
    )

    results = {}
    for name, code in (("moequant convert", OURS), ("mlx-lm route", MLX_LM)):
        dst = work / name.split()[0]
        shutil.rmtree(dst, ignore_errors=True)
        results[name] = run_route(code, src, dst, args.recipe)
        shutil.rmtree(dst, ignore_errors=True)

    print(f"\n{'route':<18} {'wall s':>8} {'input GB/s':>11} {'peak GB':>8} {'output GB':>10}")
    for name, r in results.items():
        print(
            f"{name:<18} {r['wall']:>8.2f} {in_bytes / r['wall'] / 1e9:>11.3f} "
            f"{r['peak'] / 1e9:>8.2f} {r['out_bytes'] / 1e9:>10.3f}"
        )
    ours, theirs = results["moequant convert"], results["mlx-lm route"]
    speedup, mem = theirs["wall"] / ours["wall"], ours["peak"] / theirs["peak"]
    ok = speedup >= 5 and mem <= 1 / 3
    print(
        f"\nspeedup {speedup:.1f}x, peak memory {mem:.2f}x of mlx-lm's "
        f"(target >= 5x and <= 0.33x: {'met' if ok else 'NOT met'})"
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
