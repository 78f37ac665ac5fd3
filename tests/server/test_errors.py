"""Bad input and faults: each gets its status and an OpenAI-style error body, and the server
answers the next good request."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

pytestmark = pytest.mark.real_model

MODEL = "kiln-test-model"
CHAT = [{"role": "user", "content": "Say hi."}]


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.v1 + path, timeout=60, **kwargs)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def _still_serves(server) -> None:
    r = _post(server, "/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_malformed_json(server) -> None:
    r = _post(server, "/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert "JSON" in _error(r, 400)["message"]
    _still_serves(server)


@pytest.mark.parametrize("body, param", [
    ({"messages": CHAT, "max_tokens": "many"}, "max_tokens"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": CHAT, "stream": {"yes": 1}}, "stream"),
    ({}, "messages"),
])
def test_wrong_types(server, body: dict, param: str) -> None:
    err = _error(_post(server, "/chat/completions", json={"model": MODEL, **body}), 400)
    assert err["param"] == param and param in err["message"]


def test_completion_wrong_prompt_type(server) -> None:
    err = _error(_post(server, "/completions", json={"model": MODEL, "prompt": {"text": "hi"}}), 400)
    assert err["param"] == "prompt"


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("top_p", 0), ("n", 0), ("max_tokens", 0), ("presence_penalty", 3.0), ("top_k", -5),
])
def test_out_of_range_values(client, server, field: str, value) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, extra_body={field: value})
    err = _error(info.value.response, 400)
    assert err["param"] == field and field in err["message"]
    _still_serves(server)


def test_empty_messages_and_empty_prompt(server) -> None:
    err = _error(_post(server, "/chat/completions", json={"model": MODEL, "messages": []}), 400)
    assert "at least one message" in err["message"]
    err = _error(_post(server, "/completions", json={"model": MODEL, "prompt": []}), 400)
    assert err["param"] == "prompt"


def test_prompt_longer_than_context(server) -> None:
    limit = server.engine.max_model_len
    r = _post(server, "/completions", json={"model": MODEL, "prompt": "hello " * (limit + 100), "max_tokens": 4})
    err = _error(r, 400)
    n = len(server.engine.tokenizer.encode("hello " * (limit + 100)))
    assert str(n) in err["message"] and str(limit) in err["message"] and err["code"] == "context_length_exceeded"
    # prompt fits but prompt + max_tokens does not
    r = _post(server, "/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": limit})
    err = _error(r, 400)
    assert str(limit) in err["message"] and err["param"] == "max_tokens"
    _still_serves(server)


def test_unknown_model_and_route(client, server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=CHAT, max_tokens=2)
    err = _error(info.value.response, 404)
    assert err["code"] == "model_not_found" and "gpt-17" in err["message"]
    _error(httpx.get(server.v1 + "/models/gpt-17"), 404)
    _error(httpx.get(server.url + "/no/such/route"), 404)
    _error(httpx.get(server.v1 + "/chat/completions"), 405)


def test_unsupported_features_are_refused_not_ignored(server) -> None:
    tools = [{"type": "code_interpreter"}]  # kiln serves function tools only
    assert _error(_post(server, "/chat/completions", json={"model": MODEL, "messages": CHAT, "tools": tools}), 400)["param"] == "tools"
    assert _error(_post(server, "/completions", json={"model": MODEL, "prompt": "a", "suffix": "b"}), 400)["param"] == "suffix"
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    _error(_post(server, "/chat/completions", json={"model": MODEL, "messages": msgs}), 400)


def test_api_key(async_engine, serve_app) -> None:
    from kiln.entrypoints.openai.api_server import build_app

    with serve_app(build_app(async_engine, MODEL, api_key="sekret")) as url:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
        err = _error(httpx.post(url + "/v1/chat/completions", json=body), 401)
        assert err["code"] == "invalid_api_key"
        _error(httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
        _error(httpx.get(url + "/v1/models"), 401)
        assert httpx.get(url + "/health").status_code == 200
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0) as good:
            assert good.chat.completions.create(**body).choices[0].message.content is not None


class _HeldEngine:
    """Blocks the engine thread at its next step until released, so requests pile up in the queue."""

    def __init__(self, async_engine) -> None:
        self.engine = async_engine.engine
        self.entered, self.release = threading.Event(), threading.Event()

    def __enter__(self) -> "_HeldEngine":
        real = type(self.engine).step

        def held_step(engine_self):
            self.entered.set()
            self.release.wait(30)
            del engine_self.step  # back to the real method
            return real(engine_self)

        self.engine.step = held_step.__get__(self.engine)
        return self

    def __exit__(self, *exc) -> None:
        if not self.entered.is_set():
            self.engine.__dict__.pop("step", None)
        self.release.set()


def test_queue_full_gets_503_with_retry_after(server) -> None:
    ae = server.engine
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=server.v1, timeout=60) as http:
            with _HeldEngine(ae) as held:
                first = asyncio.create_task(http.post("/chat/completions", json=body))
                await asyncio.to_thread(held.entered.wait, 10)  # engine thread is held before step()
                # The held request has not been scheduled yet, so it is waiting: 1 + 2 queued = full.
                ae.max_queue = 3
                try:
                    queued = [asyncio.create_task(http.post("/chat/completions", json=body)) for _ in range(2)]
                    for _ in range(500):
                        if ae._pending_adds + ae._num_waiting >= 3:
                            break
                        await asyncio.sleep(0.01)
                    rejected = await http.post("/chat/completions", json=body)
                finally:
                    ae.max_queue = None
                err = _error(rejected, 503)
                assert rejected.headers["retry-after"] == "1" and err["code"] == "queue_full"
            return [r.status_code for r in await asyncio.gather(first, *queued)]

    assert asyncio.run(scenario()) == [200, 200, 200]
    _still_serves(server)


def test_failure_inside_step_fails_its_requests_not_the_server(server, client, metrics) -> None:
    engine = server.engine.engine
    before = metrics[1](server)
    failures = []

    def broken_execute(*args, **kwargs):
        failures.append(1)
        del engine.runner.execute  # fail once
        raise RuntimeError("injected fault")

    engine.runner.execute = broken_execute
    r = _post(server, "/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 4})
    err = _error(r, 500)
    assert "injected fault" in err["message"] and err["type"] == "server_error"
    assert failures == [1]

    engine.runner.execute = broken_execute
    with pytest.raises(openai.APIError, match="injected fault"):
        for _ in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True):
            pass
    assert httpx.get(server.url + "/health").status_code == 200
    _still_serves(server)
    m = metrics[1](server)
    err_key = 'kiln:request_success_total{finish_reason="error"}'
    assert m["kiln:kv_cache_blocks_in_use"] == 0
    assert m["kiln:engine_step_errors_total"] - before["kiln:engine_step_errors_total"] == 2
    assert m[err_key] - before[err_key] == 2
