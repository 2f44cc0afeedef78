"""Where a decode token's parallel jobs lose time in the CPU thread pool: decodes with
MOEQUANT_POOL_TRACE set (csrc/common/thread_pool.cpp records every job's submit, each
task's thread, start and stop, and its end) and prints, per token, the sums over the
token's jobs: their wall time, each thread's busy time, the calling thread's start after
the submit, the worker's start after the submit (the caller alone at the job's start),
the tail (from the first thread's last stop to the last one's: one thread alone at the
end), the caller's return after the last stop (its wake-up), the jobs no worker joined,
and the jobs by size.

    python bench/pool_trace.py e2e [--tokens 24]           # bench_moe's e2e model, bf16
    python bench/pool_trace.py MODEL_DIR [--tokens 24]     # a converted model (the Kimi pair)

The pool's own environment (MOEQUANT_SPIN_US, ...) applies as set by the caller.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATS = (
    ("wall", "the jobs' wall time (submit to return)"),
    ("busy_caller", "calling thread busy in tasks"),
    ("busy_worker", "workers busy in tasks"),
    ("caller_start", "calling thread's first task after the submit"),
    ("worker_start", "worker's first task after the submit (caller alone)"),
    ("tail", "first thread's last stop to the last one's (one thread alone)"),
    ("caller_return", "last stop to the caller's return (its wake-up)"),
    ("no_worker", "wall of the jobs no worker joined"),
)
SIZES = ((20e3, "<20us"), (100e3, "<100us"), (500e3, "<500us"), (2e6, "<2ms"), (float("inf"), ">=2ms"))


def decode(model: str, tokens: int) -> list[int]:
    """Token boundaries (time.monotonic_ns, the clock of the trace) of `tokens` decode steps."""
    import mlx.core as mx

    import moequant

    mx.set_default_device(mx.cpu)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    marks = []
    if model == "e2e":
        from mlx_lm.generate import generate_step

        from bench_moe import E2E_CONFIG, decode_tps
        from moequant.testing import tiny_deepseek

        net, _ = tiny_deepseek.build(E2E_CONFIG, seed=0, bits=4, group_size=64, dtype=mx.bfloat16)
        moequant.patch(net)
        prompt = mx.array(list(range(1, 17)))
        decode_tps(net, prompt, 3)  # warm-up
        for _ in generate_step(prompt, net, max_tokens=tokens + 1):
            marks.append(time.monotonic_ns())
    else:
        from bench_kimi_pair import greedy_steps
        from moequant.evaluate import load_model

        marks = greedy_steps(load_model(Path(model), fused=True), tokens, time.monotonic_ns)[0]
    return marks


def split(trace: Path, marks: list[int]) -> str:
    lo, hi, ntok = marks[0], marks[-1], len(marks) - 1
    s, sizes = collections.Counter(), collections.Counter()
    jobs = 0
    for line in trace.read_text().splitlines():
        f = line.split()
        submit, end = int(f[0]), int(f[1])
        if not lo <= submit < hi:
            continue
        tasks = [tuple(int(v) for v in t.split(":")) for t in f[3:]]
        jobs += 1
        s["wall"] += end - submit
        for thread, start, stop in tasks:
            s["busy_worker" if thread else "busy_caller"] += stop - start
        caller = [start for thread, start, _ in tasks if thread == 0]
        worker = [start for thread, start, _ in tasks if thread != 0]
        s["caller_start"] += min(caller) - submit if caller else 0
        if worker:
            s["worker_start"] += min(worker) - submit
        else:
            s["no_worker"] += end - submit
            s["no_worker_jobs"] += 1
        last = {}
        for thread, _, stop in tasks:
            last[thread] = max(last.get(thread, 0), stop)
        s["tail"] += max(last.values()) - min(last.values())
        s["caller_return"] += end - max(last.values())
        size = next(name for limit, name in SIZES if end - submit < limit)
        sizes[size] += 1
        sizes[size + "_ns"] += end - submit
    out = [f"{ntok} tokens, {(hi - lo) / 1e6 / ntok:.2f} ms/token, {jobs / ntok:.1f} parallel jobs per token"]
    out += [f"  {k:14s} {s[k] / ntok / 1e6:7.3f} ms/token  {what}" for k, what in STATS]
    out.append(f"  jobs no worker joined: {s['no_worker_jobs'] / ntok:.1f} per token")
    for _, name in SIZES:
        out.append(
            f"  jobs {name:7s} {sizes[name] / ntok:5.1f} per token, {sizes[name + '_ns'] / ntok / 1e6:7.3f} ms/token"
        )
    return "\n".join(out)


def build_parser():
    ap = argparse.ArgumentParser(
        prog="pool_trace.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", help="'e2e' (bench_moe's e2e model, bf16) or a converted model directory")
    ap.add_argument("--tokens", type=int, default=24, help="decode steps traced (default 24)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.child:  # the traced process: the trace is written at its exit
        Path(args.child).write_text(" ".join(map(str, decode(args.model, args.tokens))))
        return
    with tempfile.TemporaryDirectory() as d:
        trace, marks = Path(d, "pool.trace"), Path(d, "marks")
        env = dict(os.environ, MOEQUANT_POOL_TRACE=str(trace))
        cmd = [sys.executable, __file__, args.model, "--tokens", str(args.tokens), "--child", str(marks)]
        subprocess.run(cmd, env=env, check=True)
        print(split(trace, [int(v) for v in marks.read_text().split()]))


if __name__ == "__main__":
    main()
