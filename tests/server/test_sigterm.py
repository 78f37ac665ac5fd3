"""`kiln serve` as a real process: start-up line, SIGTERM lets the in-flight request finish, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_request_and_exits_0(default_gguf_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "serve", "--model", str(default_gguf_path), "--dtype", "float32",
           "--kv-cache-memory", "256MiB", "--port", str(port), "--served-model-name", "m", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)

        body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            # New connections are refused soon after the signal, while this stream goes on.
            refused_by = time.monotonic() + 5
            while True:
                try:
                    httpx.get(url + "/health", timeout=0.5)
                except httpx.TransportError:
                    break
                assert time.monotonic() < refused_by, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 48
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "KV cache (auto = float16): " in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
