"""Tensor parallel as real processes: `kiln serve --tensor-parallel-size 2` under SIGTERM, and two launcher
groups of ranks joined by env:// (what `torchrun --nnodes 2` does across machines), on a tiny model.

The reference for the outputs is the one-process engine (`LLM(..., tensor_parallel_size=1)`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from loader.tiny_model import TinyModels, build_tiny_models

from kiln import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[2]
ENGINE_FLAGS = ["--threads", "1", "--kv-cache-memory", "1MiB", "--max-num-batched-tokens", "64"]
PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _reference_text(path: Path, max_tokens: int) -> str:
    llm = LLM(str(path), threads=1, kv_cache_memory=1 << 20)
    return llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0].outputs[0].text


def test_serve_tp2_answers_like_tp1_fails_clearly_when_a_worker_dies_and_leaves_none(tiny: TinyModels) -> None:
    path = tiny.gguf["tied"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "serve", "--model", str(path), "--tensor-parallel-size", "2",
           *ENGINE_FLAGS, "--port", str(port), "--served-model-name", "m", "--log-level", "warning", "--no-ui"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300  # three processes start (torch imports) on possibly busy cores
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert workers, "no worker process under the server"
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == _reference_text(path, 12)
        ranks = [p for p in workers if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(ranks) == 1  # rank 1 (the other child is multiprocessing's resource tracker)
        os.kill(ranks[0], signal.SIGKILL)
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code >= 500 and "tensor-parallel rank 1" in r.text and "restart" in r.text, r.text
        assert httpx.get(url + "/health", timeout=5).status_code != 200  # the engine says it is dead
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        gone_by = time.monotonic() + 10
        while any(_running(p) for p in workers):
            assert time.monotonic() < gone_by, f"worker(s) {[p for p in workers if _running(p)]} outlived the server"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_launcher_groups_joined_by_env_rendezvous(tiny: TinyModels) -> None:
    """Two torchrun invocations (--nnodes 2, one rank each, static rendezvous on loopback): node 0's rank 0
    runs `kiln generate`, node 1's rank 1 serves steps; the text equals the one-process engine's."""
    path = tiny.gguf["untied"]
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "kiln.entrypoints.cli", "generate", PROMPT, "--model", str(path), "--tensor-parallel-size", "2",
               "--distributed-init", "env://", "--temperature", "0", "--max-tokens", "12", *ENGINE_FLAGS]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0].strip() == _reference_text(path, 12).strip()
    assert outs[1][0].strip() == ""  # rank 1 prints nothing: it only serves steps
