"""Helpers for tests that start processes: free ports, mlx.launch, and waiting for a
`moequant serve` to answer."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p + 1 also free (mlx.launch's ring backend takes both)."""
    for _ in range(20):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                    return p
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


def launcher() -> str:
    exe = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
    if not Path(exe).exists():
        pytest.skip("mlx.launch not found")
    return exe


def post(port, body, path="/v1/chat/completions", timeout=120):
    """(status, raw body) of one request on its own connection (GET when body is None)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c.request(
            "POST" if body is not None else "GET",
            path,
            data if body is not None else None,
            {"Content-Type": "application/json"},
        )
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_for_server(port, proc, log, on_fail=None, seconds=90):
    """Poll ``port`` with a tiny chat request until it answers 200; fail the test with
    the server's log if the process ends or ``seconds`` pass first."""
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    deadline = time.time() + seconds
    while True:
        try:
            status, _ = post(port, hi, timeout=60)
            assert status == 200
            return hi
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                if on_fail:
                    on_fail()
                log.seek(0)
                pytest.fail("server did not answer:\n" + log.read())
            time.sleep(0.5)
