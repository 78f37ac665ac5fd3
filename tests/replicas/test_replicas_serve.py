"""`kiln serve --replicas 2` on a local Ray instance, driven by the official `openai` client, on a tiny model.

* 64 concurrent streaming clients: 0 errors, every response complete (as many tokens as asked, a finish
  reason, usage), and each greedy text equal to the one-process engine's (`LLM`, the reference) for
  its prompt, whichever replica served it; both replicas served some; the API key is enforced.
* One replica killed (SIGKILL, its pid from /metrics) while 32 streams run: every stream ends within
  the test's timeout, either complete or with the error that names the dead replica; the other replica
  carries on; Ray Serve restarts the dead one (a new replica with a new pid reports in); requests after
  that succeed.

One server for the module (Ray and three actors start once); the kill test runs last.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from loader.tiny_model import TinyModels, build_tiny_models

from kiln import LLM, SamplingParams
from kiln.bench.serving import free_port

pytest.importorskip("ray.serve", reason="the replica tests need the test extra (ray[serve])")
openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[2]
KEY = "replica-test-key"
PROMPTS = [f"the cat number {i} sat on the mat" for i in range(8)]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def replica_pids(url: str) -> dict[str, int]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m[1]: int(m[2]) for m in re.finditer(r'kiln:replica_info\{replica="([^"]+)",pid="(\d+)"\}', text)}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) while waiting for {what}:\n{proc.stdout.read()}")
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tiny: TinyModels) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "serve", "--model", str(tiny.gguf["tied"]),
           "--replicas", "2", "--threads", "1", "--kv-cache-memory", "1MiB", "--max-num-batched-tokens", "64",
           # 4 running per replica, the rest queued inside it: a replica killed mid-run then holds both
           # requests that streamed tokens (they fail) and requests that did not (they are retried)
           "--max-num-seqs", "4",
           "--port", str(port), "--served-model-name", "m", "--api-key", KEY, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        # Ray, its controller, proxy and three actors start on 2 possibly busy cores
        wait_for(lambda: len(replica_pids(url)) == 2, 400, "two replicas reporting", proc)
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(tiny: TinyModels) -> dict[str, str]:
    """The one-process engine's greedy chat answers (the same chat template, the same model)."""
    llm = LLM(str(tiny.gguf["tied"]), threads=1, kv_cache_memory=1 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}


async def stream_chat(client, prompt: str, max_tokens: int) -> dict:
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return {"prompt": prompt, "text": "".join(text), "finish": finish, "usage": usage}


def served_per_replica(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in
            re.finditer(r'kiln:request_success_total\{replica="([^"]+)",finish_reason="length"\} (\S+)', text)}


def test_64_concurrent_streaming_clients_complete_and_match_the_one_engine_output(
        server: str, reference: dict[str, str]) -> None:
    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, timeout=300, max_retries=0)
        jobs = [stream_chat(client, PROMPTS[i % len(PROMPTS)], MAX_TOKENS) for i in range(64)]
        return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 600)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for r in results:
        assert r["finish"] == "length" and r["usage"].completion_tokens == MAX_TOKENS, r
        assert r["text"] == reference[r["prompt"]], r
    # the replicas push their metrics about once a second: wait for the last requests to show
    wait_for(lambda: sum(served_per_replica(server).values()) >= 64, 30, "the 64 requests in /metrics")
    served = served_per_replica(server)
    assert len(served) == 2 and all(v > 0 for v in served.values()), served  # both replicas served
    # the same app as `kiln serve`: the API key is enforced, /health and /metrics stay open
    r = httpx.post(server + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1}, timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server + "/health", timeout=10).json() == {"status": "ok"}
    headers = {"Authorization": f"Bearer {KEY}"}
    assert [m["id"] for m in httpx.get(server + "/v1/models", headers=headers, timeout=30).json()["data"]] == ["m"]
    # adapters are per engine: the replicas refuse to load one, with the reason
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}, headers=headers,
                   timeout=30)
    assert r.status_code == 400 and "--replicas" in r.json()["error"]["message"], r.text


def busiest_replica(url: str, timeout: float) -> tuple[str, int]:
    """The replica with the most requests running or queued (per /metrics), once some are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        load: dict[str, float] = {}
        for m in re.finditer(r'kiln:num_requests_(?:running|waiting)\{replica="([^"]+)"\} (\S+)', text):
            load[m[1]] = load.get(m[1], 0.0) + float(m[2])
        if load and max(load.values()) >= 2:
            name = max(load, key=load.__getitem__)
            return name, replica_pids(url)[name]
        time.sleep(0.2)
    raise AssertionError("no replica ever had requests in flight")


def test_a_killed_replica_fails_its_requests_clearly_the_other_carries_on_and_ray_restarts_it(
        server: str, reference: dict[str, str]) -> None:
    n_tokens = 200  # long enough that the kill lands mid-stream

    async def run() -> tuple[tuple[str, int], list]:
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, timeout=120, max_retries=0)
        tasks = [asyncio.ensure_future(stream_chat(client, PROMPTS[i % len(PROMPTS)], n_tokens)) for i in range(32)]
        victim = await asyncio.to_thread(busiest_replica, server, 120)
        os.kill(victim[1], signal.SIGKILL)
        return victim, await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)  # no hang

    (victim_name, victim_pid), results = asyncio.run(run())
    complete = [r for r in results if isinstance(r, dict)]
    failed = [r for r in results if isinstance(r, BaseException)]
    for r in complete:
        assert r["finish"] == "length" and r["usage"].completion_tokens == n_tokens, r
    for exc in failed:  # the dead replica's requests that had streamed: one clear message, not a hang
        assert isinstance(exc, openai.APIError) and "replica" in str(exc) and "restarting" in str(exc), repr(exc)
    assert failed, "the kill hit no request in flight"
    assert len(complete) > len(failed), (len(complete), len(failed))  # the survivor and the retried ones
    # Ray Serve replaces the dead replica: a new one (new name, new pid) reports in beside the survivor
    wait_for(lambda: len(after := replica_pids(server)) == 2 and victim_name not in after
             and victim_pid not in after.values(), 240, "the killed replica to be replaced")

    async def again() -> list:
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, timeout=120, max_retries=0)
        return await asyncio.gather(*[stream_chat(client, p, MAX_TOKENS) for p in PROMPTS])

    for r in asyncio.run(again()):
        assert r["text"] == reference[r["prompt"]]
