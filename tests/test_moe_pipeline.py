"""Two-rank pipeline-parallel and tensor-parallel decode (mlx.launch, ring backend,
localhost) with the fused path give the tokens of one unpatched process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import process_util
from moequant.testing import tiny_deepseek

WORKER = Path(__file__).with_name("pipeline_worker.py")


@pytest.mark.parametrize("mode,patched", [("pipeline", (2, 1)), ("tensor", (3, 3))])
def test_two_ranks_match_one_process(tmp_path, mode, patched):
    launcher = process_util.launcher()
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    # Four layers (layer 0 dense). Pipelined, rank 0 holds layers 2-3 and rank 1 layers
    # 0-1; tensor-parallel, each rank holds half of every expert's I (group size 32 so
    # that the halves of the 64-wide down projections stay whole groups).
    cfg = dict(tiny_deepseek.TINY_CONFIG, num_hidden_layers=4)
    model, cfg = tiny_deepseek.build(cfg, seed=7, group_size=32)
    path = tiny_deepseek.save(model, cfg, tmp_path / "m")
    one, _ = load(str(path))
    prompt = mx.array(list(range(40, 52)))
    want = [int(t) for t, _ in generate_step(prompt, one, max_tokens=12)]

    r = subprocess.run(
        [
            launcher,
            "--backend",
            "ring",
            "--hosts",
            "127.0.0.1",
            "-n",
            "2",
            "--starting-port",
            str(process_util.free_port_pair()),
            sys.executable,
            str(WORKER),
            str(path),
            "fused",
            "12",
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert r.returncode == 0 and len(lines) == 2, r.stdout + r.stderr
    by_rank = {l["rank"]: l for l in lines}
    assert by_rank[0]["size"] == 2
    assert (by_rank[0]["patched"], by_rank[1]["patched"]) == patched
    assert by_rank[0]["tokens"] == want and by_rank[1]["tokens"] == want


def test_pipeline_with_kv_bits(tmp_path):
    """Two pipelined ranks decoding with an 8-bit latent KV cache (moequant.patch on each
    rank) give the tokens of one patched process with the same cache."""
    launcher = process_util.launcher()
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    import moequant

    cfg = dict(tiny_deepseek.TINY_CONFIG, num_hidden_layers=4, kv_lora_rank=128, qk_rope_head_dim=64)
    model, cfg = tiny_deepseek.build(cfg, seed=7, group_size=32)
    path = tiny_deepseek.save(model, cfg, tmp_path / "m")
    one, _ = load(str(path))
    moequant.patch(one)
    prompt = mx.array(list(range(40, 52)))
    want = [int(t) for t, _ in generate_step(prompt, one, max_tokens=10, kv_bits=8, quantized_kv_start=0)]
    r = subprocess.run(
        [
            launcher,
            "--backend",
            "ring",
            "--hosts",
            "127.0.0.1",
            "-n",
            "2",
            "--starting-port",
            str(process_util.free_port_pair()),
            sys.executable,
            str(WORKER),
            str(path),
            "fused",
            "10",
            "pipeline",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert r.returncode == 0 and len(lines) == 2, r.stdout + r.stderr
    assert all(l["tokens"] == want for l in lines)
