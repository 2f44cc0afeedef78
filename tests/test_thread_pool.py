"""The CPU thread pool (csrc/common/thread_pool.cpp) under its wait policies: jobs back to
back and after pauses give the outputs of one thread, bit for bit, with the default waits
(the calling thread spins with sched_yield for the workers' last tasks, idle workers
park), with both sides parking at once (MOEQUANT_SPIN_US=0) and with both spinning
(MOEQUANT_SPIN_US=N, pause or sched_yield); MOEQUANT_POOL_TRACE records every job, and
says on stderr when it cannot write its file; processes given one trace path never mix
their lines (the file is written aside and renamed over the path)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs in a child: the pool reads its environment (spin policy, trace path) once per process.
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
    {tail}
    """
)
JOBS = 160  # parallel jobs of one child: 2 thread counts x 2 runs x 40 calls (300 rows: 2+ chunks)


def child_cmd(tmp_path: Path, tail: str = "") -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).resolve().parent), tail=tail))
    return [sys.executable, str(script)]


def child_env(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOEQUANT_")}
    full.update(env)
    return full


def run_child(tmp_path: Path, preexec_fn=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        child_cmd(tmp_path),
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def check_trace(trace: Path, jobs: int = JOBS):
    lines = trace.read_text().splitlines()
    assert len(lines) == jobs, len(lines)
    for line in lines:
        submit, end, items, *tasks = line.split()
        assert int(end) >= int(submit) and int(items) > 0 and len(tasks) >= 2
        for t in tasks:
            thread, start, stop = (int(v) for v in t.split(":"))
            assert thread >= 0 and int(submit) <= start <= stop <= int(end)


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
    check_trace(trace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py", "pool.trace"]  # no temporaries left


def _file_size_limit():
    # The child's writes past 4 KiB fail with EFBIG, as on a full disk (SIGXFSZ ignored).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("case", ("missing-dir", "a-directory", "write-fails", "read-only-dir"))
def test_trace_unwritable_says_so(tmp_path, case):
    """No trace can be written: the process still succeeds, one stderr line names the path
    and the reason, and nothing is left behind (no partial trace, no temporary file)."""
    preexec = None
    if case == "missing-dir":
        trace = tmp_path / "no" / "such" / "pool.trace"
    elif case == "a-directory":
        trace = tmp_path / "adir"
        trace.mkdir()
    elif case == "write-fails":
        trace = tmp_path / "pool.trace"
        preexec = _file_size_limit
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        trace = tmp_path / "ro" / "pool.trace"
        trace.parent.mkdir()
        trace.parent.chmod(0o500)
    before = sorted(tmp_path.rglob("*"))
    try:
        r = run_child(tmp_path, preexec_fn=preexec, MOEQUANT_POOL_TRACE=str(trace))
    finally:
        if case == "read-only-dir":
            trace.parent.chmod(0o700)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "MOEQUANT_POOL_TRACE" in line]
    assert len(said) == 1 and str(trace) in said[0], r.stderr[-3000:]
    reason = {
        "missing-dir": "No such file or directory",
        "a-directory": "Is a directory",
        "write-fails": "File too large",
        "read-only-dir": "Permission denied",
    }[case]
    assert reason in said[0], said[0]
    assert sorted(tmp_path.rglob("*")) == sorted(before + [tmp_path / "child.py"])


def test_trace_without_jobs_replaces_an_old_one(tmp_path):
    """A process that runs no parallel job writes an empty trace: an older file at the path
    is not left looking like this run's."""
    trace = tmp_path / "pool.trace"
    trace.write_text("1 2 3 0:1:2 1:1:2\n")
    code = "import mlx.core as mx, moequant; moequant.set_num_threads(1); print('ok')"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(MOEQUANT_POOL_TRACE=str(trace)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    assert trace.read_text() == ""


def test_trace_replaces_the_path_not_a_linked_file(tmp_path):
    """The trace replaces the named path: a file hard-linked to it is not overwritten."""
    other = tmp_path / "other.txt"
    other.write_text("keep me\n")
    trace = tmp_path / "pool.trace"
    os.link(other, trace)
    r = run_child(tmp_path, MOEQUANT_POOL_TRACE=str(trace))
    assert r.returncode == 0, r.stderr[-3000:]
    assert other.read_text() == "keep me\n"
    check_trace(trace)


def test_trace_concurrent_writers(tmp_path):
    """Two processes given one trace path, leaving together: the file is one whole trace
    (the last writer's), never lines of both, and no temporary file is left."""
    trace = tmp_path / "pool.trace"
    go = tmp_path / "go"
    # Each child says it is ready, then waits for the other before it exits (writes).
    cmd = child_cmd(
        tmp_path,
        f"import os\nsys.stdout.flush()\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.001)",
    )
    env = child_env(MOEQUANT_POOL_TRACE=str(trace))
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ok"
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    check_trace(trace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py", "go", "pool.trace"]
