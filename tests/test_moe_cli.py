"""`moequant generate` and `moequant serve` on a saved tiny DeepSeek-V3 model."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

import process_util
from moequant.testing import tiny_deepseek
from process_util import free_port


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, cfg = tiny_deepseek.build(seed=6)
    return tiny_deepseek.save(model, cfg, tmp_path_factory.mktemp("tiny") / "m")


def moequant(*args, timeout=120, **kw):
    return subprocess.run(
        [sys.executable, "-m", "moequant", *args], capture_output=True, text=True, timeout=timeout, **kw
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
    r = moequant(
        "generate", "--model", str(model_dir), "--prompt", "hello", "--max-tokens", "4", "--huge-pages"
    )
    assert r.returncode == 0, r.stderr
    # The tiny model's arrays are below the 4 MiB threshold: nothing to move, said so.
    assert "[moequant] huge pages: 0 MiB moved" in r.stderr
    assert "Generation: 4 tokens" in r.stdout


def test_generate_needs_model():
    r = moequant("generate", "--prompt", "hi")
    assert r.returncode == 2 and "--model DIR is required" in r.stderr


def test_serve_chat_completion(server):
    port, _, hi, log = server
    status, reply = post(port, {**hi, "max_tokens": 8, "temperature": 0.0})
    assert status == 200
    assert reply["object"] == "chat.completion"
    assert reply["usage"]["completion_tokens"] >= 1
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert "[moequant] fused MoE path: 2 MoE blocks" in log.read_text()


# --- bad --model: one line, exit 2, before anything starts -------------------------------


def bad_models(tmp_path, model_dir):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a model")
    return {
        "missing (mlx-lm would try the Hub)": tmp_path / "no-such-org" / "no-such-model",
        "not a model directory": tmp_path / "notes",
        "a file": model_dir / "config.json",
    }


@pytest.mark.parametrize("cmd", ["generate", "serve"])
def test_bad_model_is_one_line_exit_2(cmd, model_dir, tmp_path):
    for what, path in bad_models(tmp_path, model_dir).items():
        extra = ("--prompt", "hi") if cmd == "generate" else ("--port", str(free_port()))
        r = moequant(cmd, "--model", str(path), *extra, timeout=60)
        assert r.returncode == 2, (what, r.stderr)
        assert r.stderr.strip().splitlines() == [r.stderr.strip()], (what, r.stderr)
        assert r.stderr.startswith(f"moequant {cmd}: error: --model {path}"), (what, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout


@pytest.fixture(scope="module")
def corrupt_model_dir(model_dir, tmp_path_factory):
    # Passes the directory check; its weights cannot be loaded.
    d = tmp_path_factory.mktemp("corrupt") / "m"
    shutil.copytree(model_dir, d)
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    return d


def test_generate_unloadable_model(corrupt_model_dir):
    r = moequant("generate", "--model", str(corrupt_model_dir), "--prompt", "hi", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(f"moequant generate: error: --model {corrupt_model_dir}: cannot load the model")
    )


def test_serve_exits_when_the_generation_thread_dies(corrupt_model_dir):
    # The generation thread loads the model and dies; the server used to keep answering
    # every request with 404 "generation thread died". Now it stops, exit code 2.
    r = moequant("serve", "--model", str(corrupt_model_dir), "--port", str(free_port()), timeout=60)
    assert r.returncode == 2, r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(f"moequant serve: error: --model {corrupt_model_dir}: cannot load the model")
    )


# --- requests that used to crash the server, concurrency, /v1/models ---------------------


def post(port, body, path="/v1/chat/completions", timeout=120):
    """(status, parsed JSON body) of one request on its own connection."""
    status, raw = process_util.post(port, body, path, timeout)
    return status, json.loads(raw or b"null")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """A `moequant serve` on the tiny model, with no Hugging Face cache at all."""
    tmp = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "HF_HOME": str(tmp / "hf-home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    port = free_port()
    log = open(tmp / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moequant", "serve", "--model", str(model_dir), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    hi = process_util.wait_for_server(port, proc, log)
    yield port, proc, hi, tmp / "serve.log"
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


# Each of these crashed the process (SIGSEGV: logit_bias past the vocabulary), killed the
# generation thread (top_k >= vocabulary raises in the sampler; ids that overflow
# mx.array) or was silently accepted (NaN, booleans as numbers).
BAD_REQUESTS = [
    ({"logit_bias": {"999999999": 1.0}}, "logit_bias token id 999999999 is outside the vocabulary"),
    ({"logit_bias": {"-1": 1.0}}, "logit_bias token id -1"),
    ({"logit_bias": {"3": float("nan")}}, "logit_bias value for token 3 must be finite"),
    ({"top_k": 10**6}, "top_k must be less than the vocabulary size"),
    ({"temperature": float("nan")}, "temperature must be finite"),
    ({"temperature": float("inf")}, "temperature must be finite"),
    ({"top_p": 1.5}, "top_p must be at most 1"),
    ({"min_p": -0.1}, "min_p must be at least 0"),
    ({"temperature": -1}, "temperature must be at least 0"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty must be finite"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"max_tokens": True}, "max_tokens must be a number, not a boolean"),
    ({"max_tokens": 10**30}, "max_tokens must be at most"),
    ({"max_tokens": "8"}, "max_tokens must be of type int"),
    ({"seed": 2**70}, "seed must be at most"),
    ({"repetition_context_size": 10**30}, "repetition_context_size must be at most"),
    ({"messages": "hi"}, "messages must be a list of objects"),
    ({"stop": 5}, "stop must be a string or a list of strings"),
    ({"model": "some-org/some-model"}, "is not served here"),
    ({"adapters": "/tmp"}, "does not load draft models or adapters"),
]


@pytest.mark.parametrize("change,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_serve_bad_request_is_400(server, change, message):
    port, proc, hi, _ = server
    body = json.dumps({**hi, **change}, allow_nan=True).encode()  # NaN as JSON's NaN
    status, reply = post(port, body)
    assert status == 400 and message in reply["error"], (status, reply)
    # The server is alive and still answers.
    assert proc.poll() is None
    assert post(port, hi)[0] == 200


def test_serve_malformed_json_is_400(server):
    port, proc, hi, _ = server
    for body in (b"{not json", b"[1, 2]", b'"text"'):
        status, reply = post(port, body)
        assert status == 400 and "error" in reply
    assert proc.poll() is None and post(port, hi)[0] == 200


def test_serve_valid_logit_bias_and_served_model_id(server, model_dir):
    port, _, hi, _ = server
    status, reply = post(port, {**hi, "logit_bias": {"5": 100.0}, "max_tokens": 3})
    assert status == 200
    # A +100 bias makes token 5 the greedy pick at every step.
    assert reply["usage"]["completion_tokens"] >= 1
    status, _ = post(port, {**hi, "model": str(model_dir.resolve())})
    assert status == 200


def test_serve_50_concurrent_clients(server):
    # http.server's listen backlog of 5 reset 3-10% of 20 concurrent connections.
    port, _, hi, _ = server
    n = 50
    barrier = threading.Barrier(n)
    results = [None] * n

    def client(i):
        barrier.wait()
        try:
            results[i] = post(port, hi)[0]
        except OSError as e:
            results[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * n


def test_serve_lists_the_served_model_without_hf_cache(server, model_dir):
    port, _, _, _ = server
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/v1/models")
    r = c.getresponse()
    assert r.status == 200
    listing = json.loads(r.read())
    c.close()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [str(model_dir.resolve())]


def test_serve_stops_when_the_generation_thread_dies_while_serving(monkeypatch):
    # A failure inside the generation loop (after loading) used to leave the HTTP server
    # up, answering "generation thread died" forever: now the server stops and
    # `moequant serve` exits 1 with the error.
    import types

    import mlx_lm.server

    from moequant import serve_cli

    def die(self):
        raise RuntimeError("boom in the generation loop")

    monkeypatch.setattr(mlx_lm.server.ResponseGenerator, "_generate", die)
    provider = types.SimpleNamespace(cli_args=types.SimpleNamespace(prompt_cache_size=1))
    port = free_port()
    with pytest.raises(serve_cli.GenerationDied, match="RuntimeError: boom in the generation loop"):
        serve_cli._serve(mlx_lm.server, "127.0.0.1", port, provider, "/m", "/m", 320)
    with socket.socket() as s:  # the listening socket was closed
        s.bind(("127.0.0.1", port))
