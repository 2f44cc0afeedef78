"""`moequant generate` and `moequant serve` on a saved tiny DeepSeek-V3 model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from moequant.testing import tiny_deepseek


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, cfg = tiny_deepseek.build(seed=6)
    return tiny_deepseek.save(model, cfg, tmp_path_factory.mktemp("tiny") / "m")


def moequant(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "moequant", *args], capture_output=True, text=True, timeout=120, **kw
    )


def test_generate_fused_and_not(model_dir):
    common = ("generate", "--model", str(model_dir), "--prompt", "hello", "--max-tokens", "16")
    fused, plain = moequant(*common), moequant(*common, "--no-fused")
    assert fused.returncode == 0, fused.stderr
    assert plain.returncode == 0, plain.stderr
    assert "[moequant] fused MoE path: 2 MoE blocks" in fused.stderr
    assert "[moequant] fused MoE path: off" in plain.stderr
    for out in (fused.stdout, plain.stdout):
        assert "Generation: 16 tokens" in out and "Peak memory" in out
    # float32 activations: the same greedy text either way.
    assert fused.stdout.split("==========")[1] == plain.stdout.split("==========")[1]


def test_generate_huge_pages(model_dir):
    r = moequant("generate", "--model", str(model_dir), "--prompt", "hello", "--max-tokens", "4",
                 "--huge-pages")
    assert r.returncode == 0, r.stderr
    # The tiny model's arrays are below the 4 MiB threshold: nothing to move, said so.
    assert "[moequant] huge pages: 0 MiB moved" in r.stderr
    assert "Generation: 4 tokens" in r.stdout


def test_generate_needs_model():
    r = moequant("generate", "--prompt", "hi")
    assert r.returncode == 2 and "--model DIR is required" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_chat_completion(model_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moequant", "serve", "--model", str(model_dir), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    try:
        body = json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0.0}
        ).encode()
        deadline = time.time() + 90
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=60) as r:
                    reply = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail("server did not answer:\n" + log.read())
                time.sleep(0.5)
        assert reply["object"] == "chat.completion"
        assert reply["usage"]["completion_tokens"] >= 1
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        log.seek(0)
        assert "[moequant] fused MoE path: 2 MoE blocks" in log.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
