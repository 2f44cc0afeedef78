"""--kv-bits in `moequant generate` / `serve` / `eval`, and the KV table of `moequant plan`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moequant.testing import tiny_deepseek

KV_CONFIG = dict(tiny_deepseek.TINY_CONFIG, kv_lora_rank=128, qk_rope_head_dim=64)
KIMI = Path(__file__).resolve().parents[1] / "python" / "moequant" / "testing" / "configs" / "kimi_k25.json"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, cfg = tiny_deepseek.build(KV_CONFIG, seed=6)
    return tiny_deepseek.save(model, cfg, tmp_path_factory.mktemp("tinykv") / "m")


def moequant(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "moequant", *args], capture_output=True, text=True, timeout=timeout
    )


def text(r):
    return r.stdout.split("==========")[1]


@pytest.mark.parametrize("fused", [True, False])
def test_generate_kv_bits(model_dir, fused):
    common = ["generate", "--model", str(model_dir), "--prompt", "hello there", "--max-tokens", "12"]
    if not fused:
        common.append("--no-fused")
    plain = moequant(*common)
    assert plain.returncode == 0, plain.stderr
    for bits in ("8", "4"):
        r = moequant(*common, "--kv-bits", bits, "--quantized-kv-start", "0")
        assert r.returncode == 0, r.stderr
        assert "Generation: 12 tokens" in r.stdout
        # The text itself is checked against an oracle in test_kv_cache (the 16-bit
        # and 8-bit runs of this tiny random model may part after a few tokens).
        assert len(text(r)) > 1


def test_generate_prompt_cache_file(model_dir, tmp_path):
    """A prompt cache saved with mlx-lm's save_prompt_cache from an 8-bit run and given to
    `moequant generate --prompt-cache-file` (mlx-lm reads it before the model loads)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import save_prompt_cache

    import moequant as mq
    from moequant.kv_cache import MLAQuantizedKVCache

    model, tok = load(str(model_dir))
    mq.patch(model)
    cache = [MLAQuantizedKVCache(group_size=64, bits=8) for _ in model.layers]
    model(mx.array(tok.encode("hello"))[None], cache=cache)
    f = tmp_path / "p.safetensors"
    save_prompt_cache(str(f), cache, {"model": str(model_dir), "tokenizer_config": "{}"})
    r = moequant(
        "generate",
        "--model",
        str(model_dir),
        "--prompt-cache-file",
        str(f),
        "--prompt",
        " there",
        "--max-tokens",
        "5",
        "--kv-bits",
        "8",
    )
    assert r.returncode == 0, r.stderr
    assert "Generation: 5 tokens" in r.stdout


@pytest.mark.parametrize(
    "flags,msg",
    [
        (["--kv-bits", "3"], "--kv-bits must be 4 or 8"),
        (["--kv-bits", "8", "--kv-group-size", "128"], "qk_rope_head_dim 64"),
        (["--kv-bits", "8", "--quantized-kv-start", "-1"], "--quantized-kv-start must be >= 0"),
    ],
)
def test_generate_bad_kv_flags(model_dir, flags, msg):
    r = moequant("generate", "--model", str(model_dir), "--prompt", "hi", *flags)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_plan_kv_table_reproduces_the_card():
    r = moequant("plan", "--config", str(KIMI))
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("KV cache (")[1].splitlines()
    rows = {l.split()[0]: l for l in table if l[:1].isdigit()}
    # The model card: fp16 2.3 / 9.2 / 18.4 GB, int8 1.2 / 4.6 / 9.2 GB at 32K / 128K / 256K.
    for ctx, fp16, int8 in (("32K", "2.3", "1.2"), ("128K", "9.2", "4.6"), ("256K", "18.4", "9.2")):
        cells = rows[ctx].split("GB")
        assert cells[0].split()[-1] == fp16 and cells[1].split()[-1] == int8, rows[ctx]
    assert "256K (max)" in r.stdout
    j = json.loads(moequant("plan", "--config", str(KIMI), "--json").stdout)["kv_cache"]
    assert j["bytes_per_token_layer"] == {"fp16": 1152, "int8 codes": 576, "8-bit g64": 612, "4-bit g64": 324}
    assert j["rows"][0]["fp16"] == 32768 * 1152 * 61


def test_serve_kv_bits(model_dir, tmp_path):
    """`moequant serve --kv-bits 8 --quantized-kv-start 0` answers chat completions (two
    requests: the second reuses the server's prompt cache)."""
    import os
    import time

    from test_moe_cli import free_port, post

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moequant",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--kv-bits",
            "8",
            "--quantized-kv-start",
            "0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 6, "temperature": 0.0}
        deadline = time.time() + 120
        while True:
            try:
                status, reply = post(port, body, timeout=60)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail("server did not answer:\n" + log.read())
                time.sleep(0.5)
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] >= 1
        status, again = post(port, body, timeout=60)
        assert status == 200 and again["choices"][0]["message"] == reply["choices"][0]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
