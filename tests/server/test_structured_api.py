"""Structured outputs and logit_bias through the HTTP API, on the real default model (fp32), with the
official openai client. JSON outputs are checked with `jsonschema` (an independent validator)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from .conftest import MODEL, Server


@pytest.fixture()
def client(server: Server):
    """The suite's client with a longer timeout: these requests generate tens of tokens each, which
    on a shared, loaded 2-core machine can take longer than the suite's 60 s."""
    from openai import OpenAI

    with OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600) as c:
        yield c

CHAT = [{"role": "user", "content": "Describe a person called Ada who is 36 years old, as JSON."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_json_schema_response_format_stream_and_not(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, response_format=FORMAT, max_tokens=120, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, response_format=FORMAT, max_tokens=120,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == choice.message.content  # same greedy output streamed


def test_json_object_greedy_and_sampled_with_n(client) -> None:
    weather = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    r = client.chat.completions.create(model=MODEL, messages=weather, response_format={"type": "json_object"},
                                       max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=MODEL, messages=weather, response_format={"type": "json_object"},
                                       max_tokens=60, temperature=0.8, n=2, seed=5)
    assert len(r.choices) == 2
    for c in r.choices:
        if c.finish_reason == "stop":  # a free-form object may outrun max_tokens; a finished one must parse
            assert isinstance(json.loads(c.message.content), dict)


def test_guided_extras_on_chat_and_completions(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       max_tokens=10, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="The date today is", max_tokens=20, temperature=0.7, seed=1,
                                  extra_body={"guided_regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"})
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    r = client.completions.create(model=MODEL, prompt="Q: Is water wet?\nA:", max_tokens=20,
                                  extra_body={"guided_grammar": gbnf})
    assert r.choices[0].text in ("The answer is yes.", "The answer is no.")
    r = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=120, temperature=0,
                                  extra_body={"response_format": FORMAT})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_bad_structured_requests_are_400_with_the_reason(server) -> None:
    url = server.v1 + "/chat/completions"
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}
    err = _error(httpx.post(url, json={"model": MODEL, "messages": CHAT, "response_format": bad_schema}), 400)
    assert err["param"] == "response_format" and "not" in err["message"]
    empty = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}
    err = _error(httpx.post(url, json={"model": MODEL, "messages": CHAT, "response_format": empty}), 400)
    assert "nsatisfiable" in err["message"]
    err = _error(httpx.post(url, json={"model": MODEL, "messages": CHAT, "response_format": {"type": "json_schema"}}), 400)
    assert err["param"] == "response_format" and "schema" in err["message"]
    err = _error(httpx.post(url, json={"model": MODEL, "messages": CHAT, "guided_regex": "[a-",
                                       "stream": True}), 400)
    assert err["param"] == "guided_regex"
    err = _error(httpx.post(url, json={"model": MODEL, "messages": CHAT, "guided_regex": "a",
                                       "guided_choice": ["b"]}), 400)
    assert "at most one" in err["message"]
    err = _error(httpx.post(server.v1 + "/completions", json={"model": MODEL, "prompt": "x",
                                                               "guided_grammar": "root ::= nothing_here"}), 400)
    assert err["param"] == "guided_grammar" and "nothing_here" in err["message"]


def test_logit_bias(client, server) -> None:
    prompt = "The capital of France is"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=2)
    top = server.engine.tokenizer.encode(free.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(top): -100})
    assert banned.choices[0].text != free.choices[0].text
    # the second-best token under the raw model is what greedy picks once the best is banned
    second = [t for t in free.choices[0].logprobs.top_logprobs[0] if t != free.choices[0].text][0]
    assert banned.choices[0].text == second
    forced = server.engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=1.0, seed=2,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == " banana" * 3
    url = server.v1 + "/completions"
    for bias, word in (({"5": 101}, "-100, 100"), ({"x": 1}, "token ids"), ({"999999": 1}, "vocabulary")):
        err = _error(httpx.post(url, json={"model": MODEL, "prompt": prompt, "logit_bias": bias}), 400)
        assert err["param"] == "logit_bias" and word in err["message"], err
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, logit_bias={"1": -200})
