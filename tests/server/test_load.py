"""Clients that hang up, and many clients at once: requests share engine steps, nothing leaks."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.real_model

MODEL = "kiln-test-model"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_request_and_frees_kv(server, metrics, stream: bool) -> None:
    scrape, wait_idle = metrics
    before = wait_idle(server)
    total_blocks = server.engine.engine.kv_budget.num_blocks
    # Long enough (ignore_eos, 400 tokens: many seconds here) that only an abort ends it in time.
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "stream": stream}
    with httpx.Client(timeout=60) as http:
        if stream:
            with http.stream("POST", server.v1 + "/completions", json=body) as r:
                assert r.status_code == 200
                lines = 0
                for line in r.iter_lines():
                    lines += bool(line)
                    if lines == 3:
                        break  # hang up mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(server.v1 + "/completions", json=body, timeout=0.5)
    hung_up = time.monotonic()
    # The abort counter tells an aborted request from one that ran its 400 tokens to the end, so the
    # deadline only bounds a hang and can allow for a busy machine.
    deadline = hung_up + 30
    abort = 'kiln:request_success_total{finish_reason="abort"}'
    while True:
        m = scrape(server.url)
        # The abort must have been counted too: on a busy machine the 0.5 s client timeout can fire
        # before the server has even queued the request, and an idle engine then says nothing yet.
        if m[abort] == before[abort] + 1 and m["kiln:num_requests_running"] == 0 \
                and m["kiln:kv_cache_blocks_in_use"] == 0:
            break
        assert time.monotonic() < deadline, f"request still running {time.monotonic() - hung_up:.1f}s after hang-up"
        time.sleep(0.05)
    assert server.engine.engine.kv_manager.get_num_free_blocks() == total_blocks
    assert server.engine.num_active_requests == 0


def test_64_concurrent_streaming_clients(server, metrics) -> None:
    from openai import AsyncOpenAI

    _, wait_idle = metrics
    wait_idle(server)
    clients, per_client, max_tokens = 64, 2, 8
    steps_before = server.engine.engine.step_count

    async def one_client(api: AsyncOpenAI, c: int) -> list[int]:
        counts = []
        for r in range(per_client):
            stream = await api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Client {c}, request {r}: say something."}],
                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True}, temperature=0.8, seed=c,
            )
            usage, finish = None, None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
            assert finish == "length"
            counts.append(usage.completion_tokens)
        return counts

    async def run() -> list[list[int]]:
        async with AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120) as api:
            return await asyncio.gather(*(one_client(api, c) for c in range(clients)))

    counts = asyncio.run(run())
    assert counts == [[max_tokens] * per_client] * clients
    tokens = clients * per_client * max_tokens
    steps = server.engine.engine.step_count - steps_before
    assert steps < tokens / 4, f"{steps} steps for {tokens} tokens: requests are not sharing steps"
    m = wait_idle(server)
    assert m["kiln:kv_cache_blocks_in_use"] == 0 and m["kiln:num_requests_running"] == 0
