"""schemathesis against the app's own OpenAPI schema (/openapi.json): whatever it generates from
the published request shapes, the server never answers 5xx.

Generation budgets (max_tokens, n, logprobs) are clamped before the call so a valid request with
max_tokens=2**63 or max_tokens=null (the rest of the context) does not make the run last hours;
every other field is left as generated.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

pytestmark = pytest.mark.real_model

BOUNDS = {"max_tokens": 3, "max_completion_tokens": 3, "n": 2, "min_tokens": 3, "logprobs": 3, "top_logprobs": 3}


def _operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _clamp(body: object) -> None:
    if not isinstance(body, dict):
        return
    for key, limit in BOUNDS.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            body[key] = limit
    # An explicit null (completions) or an absent budget (chat) means "the rest of the context":
    # thousands of tokens, which would outlast the client's timeout on a loaded 2-core machine.
    generates = "messages" in body or "prompt" in body
    if generates and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_schema_fuzz_finds_no_server_error(server, mode: GenerationMode) -> None:
    operations = _operations(server.url)
    posts = {op.path for op in operations if op.method.upper() == "POST"}
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"} <= posts, posts
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a GET without parameters has no invalid form to generate

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            _clamp(case.body)
            response = case.call(base_url=server.url, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        check()
