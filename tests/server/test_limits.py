"""Per-request resource limits: each is refused with one clear 4xx before any work starts, nothing
is queued or leaked by a refusal, and the server answers the next good request."""

from __future__ import annotations

import httpx
import openai
import pytest

from kiln.entrypoints.openai.limits import ServerLimits, StreamSlots

pytestmark = pytest.mark.real_model

MODEL = "kiln-test-model"
CHAT = [{"role": "user", "content": "Say hi."}]
LIMITS = ServerLimits(max_n=3, max_stop_strings=2, max_stop_chars=8, max_request_tokens=120, max_body_bytes=4096,
                      max_streams_per_key=1)


@pytest.fixture(scope="module")
def limited(async_engine):
    from kiln.entrypoints.openai.api_server import build_app
    from server.conftest import serve_in_thread

    with serve_in_thread(build_app(async_engine, MODEL, limits=LIMITS)) as url:
        yield url


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]


def _chat(url: str, **fields) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **fields}, timeout=300)


def test_n_and_best_of_bounds(limited: str) -> None:
    assert "at most 3" in _error(_chat(limited, n=4, max_tokens=2), 400)["message"]
    r = httpx.post(limited + "/v1/completions", json={"model": MODEL, "prompt": "a", "n": 4, "max_tokens": 1}, timeout=300)
    assert _error(r, 400)["param"] == "n"
    r = httpx.post(limited + "/v1/completions", json={"model": MODEL, "prompt": "a", "n": 2, "best_of": 3}, timeout=300)
    assert _error(r, 400)["param"] == "best_of"


def test_stop_strings_count_and_length(limited: str) -> None:
    assert "at most 2" in _error(_chat(limited, stop=["a", "b", "c"], max_tokens=2), 400)["message"]
    assert _error(_chat(limited, stop=["x" * 9], max_tokens=2), 400)["param"] == "stop"
    assert _chat(limited, stop=["xxxxxxxx", "y"], max_tokens=2).status_code == 200


def test_total_tokens_per_request(limited: str) -> None:
    err = _error(_chat(limited, n=3, max_tokens=100), 400)  # ~30 prompt tokens + 300 > 120
    assert err["code"] == "request_tokens_exceeded" and "--max-request-tokens" in err["message"]
    # max_tokens omitted: it defaults to what the budget leaves each of the n choices
    r = _chat(limited, n=2, temperature=0.8, seed=1, ignore_eos=True, stop=None)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 120
    assert all(c["finish_reason"] == "length" for c in r.json()["choices"])


def test_body_size(limited: str) -> None:
    big = [{"role": "user", "content": "x" * 5000}]
    r = httpx.post(limited + "/v1/chat/completions", json={"model": MODEL, "messages": big}, timeout=300)
    assert "--max-body-bytes" in _error(r, 413)["message"]

    def chunks():  # no Content-Length: the bytes received are counted
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    r = httpx.post(limited + "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"},
                   timeout=300)
    _error(r, 413)
    assert _chat(limited, max_tokens=2).status_code == 200


def test_open_streams_per_key(limited: str, async_engine) -> None:
    with openai.OpenAI(base_url=limited + "/v1", api_key="k1", max_retries=0, timeout=300) as client:
        first = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=64, stream=True,
                                               extra_body={"ignore_eos": True})
        next(iter(first))  # the stream is open
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True)
        assert info.value.response.headers["Retry-After"]
        # another key has its own streams; a non-streaming request is not counted
        with openai.OpenAI(base_url=limited + "/v1", api_key="k2", max_retries=0, timeout=300) as other:
            assert list(other.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, stream=True))
        assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices
        list(first)  # drain: the slot is released when the stream ends
        stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, stream=True)
        assert list(stream)


def test_stream_slots_release_once() -> None:
    slots = StreamSlots(per_key=2)
    a = slots.acquire("k")
    slots.acquire("k")
    a.release()
    a.release()  # twice: harmless
    assert slots.open_streams("k") == 1
    slots.acquire("k")
    assert slots.open_streams() == 2


def test_limits_must_be_sane() -> None:
    with pytest.raises(ValueError, match="--max-n"):
        ServerLimits(max_n=0)
    with pytest.raises(ValueError, match="--max-streams-per-key"):
        ServerLimits(max_streams_per_key=-1)
