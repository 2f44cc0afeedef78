"""The CPU thread pool (csrc/common/thread_pool.cpp) under its wait policies: jobs back to
back and after pauses give the outputs of one thread, bit for bit, with the default waits
(the calling thread spins with sched_yield for the workers' last tasks, idle workers
park), with both sides parking at once (MOEQUANT_SPIN_US=0) and with both spinning
(MOEQUANT_SPIN_US=N, pause or sched_yield); MOEQUANT_POOL_TRACE records every job."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs in a child: the spin policy is read from the environment per job, the trace path once.
CHILD = textwrap.dedent(
    """
    import sys, time
    import mlx.core as mx
    import numpy as np
    sys.path.insert(0, {tests!r})
    import moequant
    from moe_reference import make_proj

    rng = np.random.default_rng(5)
    wq, s, b, _, _ = make_proj(rng, 1, 300, 512, 4, 64)
    wq, s, b = wq[0], s[0], b[0]
    xs = [mx.array(rng.standard_normal((1, 512)).astype(np.float32)) for _ in range(8)]

    def run(pause):
        out = []
        for i in range(40):
            if pause and i % 10 == 9:
                time.sleep(0.003)  # longer than any spin: the workers park
            out.append(np.array(moequant.quantized_linear(xs[i % 8], wq, s, b, bits=4, group_size=64)))
        return out

    moequant.set_num_threads(1)
    ref = run(False)
    for n in (2, 3):
        moequant.set_num_threads(n)
        for pause in (False, True):
            got = run(pause)
            assert all(np.array_equal(r, g) for r, g in zip(ref, got)), (n, pause)
    print("ok")
    """
)


def run_child(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).resolve().parent)))
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOEQUANT_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, str(script)], env=full, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "env",
    (
        {},  # the default
        {"MOEQUANT_SPIN_US": "0"},  # park at once
        {"MOEQUANT_SPIN_US": "200"},
        {"MOEQUANT_SPIN_US": "200", "MOEQUANT_SPIN_YIELD": "1"},
    ),
    ids=("default", "park", "spin", "spin-yield"),
)
def test_wait_policies_bit_identical(tmp_path, env):
    r = run_child(tmp_path, **env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_trace_records_every_job(tmp_path):
    trace = tmp_path / "pool.trace"
    r = run_child(tmp_path, MOEQUANT_POOL_TRACE=str(trace))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = trace.read_text().splitlines()
    # 2 thread counts x 2 runs x 40 calls, each one parallel job (300 rows: 2+ chunks).
    assert len(lines) == 160, len(lines)
    for line in lines:
        submit, end, items, *tasks = line.split()
        assert int(end) >= int(submit) and int(items) > 0 and len(tasks) >= 2
        for t in tasks:
            thread, start, stop = (int(v) for v in t.split(":"))
            assert thread >= 0 and int(submit) <= start <= stop <= int(end)
