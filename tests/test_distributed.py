"""`moequant eval`, `generate` and `serve` across two ranks (mlx.launch, ring backend,
localhost): the same results as one process, and a clear, fast, every-rank error when
the ranks disagree."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moequant import evaluate as ev
from moequant.testing.tiny_mlx import make_tiny_model, quantize_tiny
from process_util import free_port, free_port_pair, launcher, post, wait_for_server

SEQ, NS = 48, 3
BY_RANK = Path(__file__).with_name("rank_args_worker.py")


def launch(argv, timeout=240, env=None, ok=True):
    """Two ranks of ``argv`` (a python command line) on localhost. ``ok``: assert that
    every rank exited with 0 (mlx.launch's own status is 0 whatever the ranks did; it
    reports a failed rank in a warning)."""
    r = subprocess.run(
        [
            launcher(),
            "--backend",
            "ring",
            "--hosts",
            "127.0.0.1",
            "-n",
            "2",
            "--starting-port",
            str(free_port_pair()),
            sys.executable,
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if ok:
        assert r.returncode == 0 and "exited with code" not in r.stderr and "was killed" not in r.stderr, (
            r.stdout + r.stderr
        )
    return r


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ref = make_tiny_model(root / "ref", seed=0, scale=8.0)
    return {
        "root": root,
        "ref": ref,
        "q4": quantize_tiny(ref, root / "q4", 4),
        "q3": quantize_tiny(ref, root / "q3", 3),
    }


def eval_args(models, build, cache, out=None):
    a = [
        "-m",
        "moequant",
        "eval",
        "--ref",
        str(models["ref"]),
        "--model",
        str(models[build]),
        "--seq-len",
        str(SEQ),
        "--num-samples",
        str(NS),
        "--cache",
        str(cache),
        "--no-progress",
    ]
    return a + (["--output", str(out)] if out else [])


def test_two_rank_eval_gives_the_one_process_report(models, tmp_path):
    one = ev.evaluate(
        str(models["ref"]),
        str(models["q4"]),
        seq_len=SEQ,
        num_samples=NS,
        cache_dir=str(tmp_path / "c1"),
        progress=False,
    )
    out = tmp_path / "r.json"
    r = launch(eval_args(models, "q4", tmp_path / "c2", out))
    assert r.returncode == 0, r.stdout + r.stderr
    two = json.loads(out.read_text())
    # One report, printed once (rank 0), with the ranks and the layer split recorded.
    assert r.stdout.count("KL(ref||build) mean") == 1, r.stdout
    d = two["distributed"]
    assert d["ranks"] == 2 and d["mode"] == "pipeline"
    for which in ("reference", "build"):
        split = d["layers_per_rank"][which]
        # mlx-lm's pipeline gives the last layers to rank 0; together the ranks hold
        # every layer exactly once.
        (a0, b0), (a1, b1) = split
        assert a1 == 0 and b1 == a0 and b0 == 3 and a0 > 0, split
    assert two["positions"] == one["positions"] == NS * (SEQ - 1)
    assert two["kl"]["mean"] == pytest.approx(one["kl"]["mean"], rel=1e-3, abs=1e-6)
    assert two["flips"]["count"] == one["flips"]["count"]
    for m in ("reference", "build"):
        assert two["perplexity"][m]["ppl"] == pytest.approx(one["perplexity"][m]["ppl"], rel=1e-4)
    assert not two["cache"]["reused"]
    # The cache was written once, by rank 0, and is reused by the next run: a run with a
    # different build against it computes no reference pass.
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == sorted(
        ["meta.json"] + [f"{f}.npy" for f in ev.ReferenceCache.FIELDS]
    )
    out3 = tmp_path / "r3.json"
    r = launch(eval_args(models, "q3", tmp_path / "c2", out3))
    assert r.returncode == 0, r.stdout + r.stderr
    three = json.loads(out3.read_text())
    assert three["cache"]["reused"] and "reference" not in three["distributed"]["layers_per_rank"]
    assert three["kl"]["mean"] > two["kl"]["mean"]


@pytest.mark.parametrize("what", ["build", "data", "missing"])
def test_ranks_that_disagree_fail_fast_on_every_rank(models, tmp_path, what):
    base = eval_args(models, "q4", tmp_path / "c")
    other = list(base)
    if what == "build":
        other[other.index("--model") + 1] = str(models["q3"])
    elif what == "data":
        other[other.index("--seq-len") + 1] = str(SEQ + 16)
    else:
        other[other.index("--model") + 1] = str(tmp_path / "nowhere")
    t0 = time.perf_counter()
    r = launch([str(BY_RANK), json.dumps([base, other])], timeout=120, ok=False)
    took = time.perf_counter() - t0
    assert took < 60, took
    err = r.stderr
    for rank in (0, 1):
        # Every rank says why and exits non-zero: 2, or SIGTERM from mlx.launch when the
        # other rank's exit reached the launcher first (mlx.launch 0.32.4 reports the
        # ranks' codes in its warnings; its own exit status stays 0).
        assert f"moequant eval (rank {rank} of 2): error:" in err, err
        assert re.search(f"Node with rank {rank} (exited with code (2|-15)|was killed)", err), err
    want = {
        "build": "the ranks disagree on build model",
        "data": "the ranks disagree on token windows",
        "missing": "rank 1 of 2: --model",
    }[what]
    assert want in err, err
    assert not (tmp_path / "c").exists()  # nothing was written


# --------------------------------------------------------------------------- generate, serve


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    from moequant.testing import tiny_deepseek

    # Four layers (layer 0 dense); group size 32 so that tensor-parallel halves of the
    # 64-wide projections stay whole groups (as tests/test_moe_pipeline.py).
    cfg = dict(tiny_deepseek.TINY_CONFIG, num_hidden_layers=4)
    model, cfg = tiny_deepseek.build(cfg, seed=6, group_size=32)
    return tiny_deepseek.save(model, cfg, tmp_path_factory.mktemp("tiny") / "m")


def generated_text(stdout: str) -> str:
    parts = stdout.split("==========")
    assert len(parts) == 3, stdout
    return parts[1]


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_two_rank_generate_prints_the_one_process_tokens(moe_model, mode):
    common = [
        "-m",
        "moequant",
        "generate",
        "--model",
        str(moe_model),
        "--prompt",
        "hello",
        "--max-tokens",
        "12",
    ]
    one = subprocess.run([sys.executable, *common], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = launch(common + (["--pipeline"] if mode == "pipeline" else []))
    assert two.returncode == 0, two.stdout + two.stderr
    # Rank 0 alone prints the answer; both ranks ran the fused path.
    assert generated_text(two.stdout) == generated_text(one.stdout)
    assert two.stderr.count("[moequant] fused MoE path:") == 2, two.stderr


def start_server(argv, log_path):
    """A server process (its own process group, so that a launcher and its ranks all
    stop together) and its port, once it answers."""
    import signal

    port = free_port()
    log = open(log_path, "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*argv, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    wait_for_server(port, proc, log, on_fail=lambda: os.killpg(proc.pid, signal.SIGTERM), seconds=120)

    def stop():
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

    return port, stop


def chat(port, stream: bool) -> str:
    body = {
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 10,
        "temperature": 0.0,
        "stream": stream,
    }
    status, raw = post(port, body)
    assert status == 200, raw
    if not stream:
        return json.loads(raw)["choices"][0]["message"]["content"]
    text = []
    lines = [l for l in raw.decode().splitlines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for l in lines[:-1]:
        for c in json.loads(l[len("data: ") :])["choices"]:
            text.append(c.get("delta", {}).get("content") or "")
    return "".join(text)


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_two_rank_serve_answers_like_one_process(moe_model, tmp_path, mode):
    serve = ["-m", "moequant", "serve", "--model", str(moe_model)]
    port1, stop1 = start_server([sys.executable, *serve], tmp_path / "one.log")
    try:
        want = chat(port1, stream=False)
        want_stream = chat(port1, stream=True)
    finally:
        stop1()
    assert want and want == want_stream
    extra = ["--pipeline"] if mode == "pipeline" else []
    port2, stop2 = start_server(
        [
            launcher(),
            "--backend",
            "ring",
            "--hosts",
            "127.0.0.1",
            "-n",
            "2",
            "--starting-port",
            str(free_port_pair()),
            sys.executable,
            *serve,
            *extra,
        ],
        tmp_path / "two.log",
    )
    try:
        assert chat(port2, stream=False) == want
        assert chat(port2, stream=True) == want
    finally:
        stop2()
    log = (tmp_path / "two.log").read_text()
    assert log.count("[moequant] fused MoE path:") == 2, log


@pytest.mark.parametrize("cmd", ["generate", "serve"])
def test_generate_and_serve_refuse_ranks_that_disagree(moe_model, models, cmd):
    base = ["-m", "moequant", cmd, "--model", str(moe_model)]
    if cmd == "generate":
        base += ["--prompt", "hello", "--max-tokens", "4"]
        other = base[:-1] + ["5"]
        want = "the ranks disagree on arguments"
    else:
        other = ["-m", "moequant", cmd, "--model", str(models["q4"])]
        want = "the ranks disagree on model"
    t0 = time.perf_counter()
    r = launch([str(BY_RANK), json.dumps([base, other])], timeout=120, ok=False)
    assert time.perf_counter() - t0 < 60
    for rank in (0, 1):
        assert f"moequant {cmd} (rank {rank} of 2): error: {want}" in r.stderr, r.stderr
        assert re.search(f"Node with rank {rank} (exited with code (2|-15)|was killed)", r.stderr)
