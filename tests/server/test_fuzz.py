"""Random request bodies (hypothesis) against every POST endpoint: never a 5xx, every 4xx in the
OpenAI error shape. Budgets (max_tokens, n) are clamped so valid requests stay cheap."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

pytestmark = pytest.mark.real_model

MODEL = "kiln-test-model"

scalars = st.none() | st.booleans() | st.integers(-3, 40) | st.floats(-3, 3, allow_nan=False) | st.text(max_size=8)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=2), max_leaves=5)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "robot"]) | values},
    optional={"content": st.text(max_size=20) | values, "name": values},
)
SPECIAL = {
    "messages": st.lists(message, max_size=3) | values,
    "prompt": st.text(max_size=20) | st.lists(st.integers(-2, 60000), max_size=5) | values,
    "model": st.just(MODEL) | values,
    "tokens": st.lists(st.integers(-2, 60000), max_size=5) | values,
}
BOUNDS = {"max_tokens": 3, "max_completion_tokens": 3, "n": 2, "min_tokens": 3, "logprobs": 3, "top_logprobs": 3}

ENDPOINTS = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


def _bodies(model_cls) -> st.SearchStrategy:
    fields = {name: SPECIAL.get(name, values) for name in model_cls.model_fields}
    return st.fixed_dictionaries({}, optional=fields)


def _clamp(body: dict) -> dict:
    for key, limit in BOUNDS.items():
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > limit:
            body[key] = limit
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2  # chat's default is "the rest of the context": too slow for a fuzz loop
    return body


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_random_bodies_never_5xx(server, path: str) -> None:
    http = httpx.Client(base_url=server.url, timeout=60)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=_bodies(ENDPOINTS[path]))
    def check(body: dict) -> None:
        r = http.post(path, json=_clamp(body))
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]") and '"server_error"' not in r.text, (body, r.text)

    try:
        check()
    finally:
        http.close()
