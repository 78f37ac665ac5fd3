"""Tool calling through `kiln serve` on the real default model, with the official openai client.

SmolLM2-135M-Instruct's chat template has no tool support, so kiln writes the tools into the
prompt itself (kiln.entrypoints.openai.tool_prompt). Forced calls ('required', a named function)
must come back as valid `tool_calls` whose arguments validate (jsonschema) against the function's
parameters; the client's loop (call → run the tool → send the result → answer) runs end to end.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from .conftest import MODEL, Server


@pytest.fixture()
def client(server: Server):
    """The suite's client with a longer timeout: these requests generate tens of tokens each, which
    on a shared, loaded 2-core machine can take longer than the suite's 60 s."""
    from openai import OpenAI

    with OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600) as c:
        yield c

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}},
                                                     "required": ["tz"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def _run_tool(name: str, args: dict) -> dict:
    return {"city": args.get("city"), "temperature": 18, "unit": args.get("unit")} if name == "get_weather" else {"time": "12:00"}


def test_openai_client_tool_loop_end_to_end(client, server) -> None:
    messages = list(ASK)
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=60, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1  # parallel calls off
    for call in choice.message.tool_calls:
        params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), params)
    # the client's loop: append the assistant message and one tool result per call, then ask again
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in choice.message.tool_calls:
        result = _run_tool(call.function.name, json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    rendered = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": messages, "tools": TOOLS}).json()
    prompt = "".join(rendered["token_strs"])
    assert "tool_response" in prompt and "get_weather" in prompt  # the result and the definitions reach the model
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=20, temperature=0)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    assert second.choices[0].finish_reason in ("stop", "length")


def test_named_function_streamed_matches_non_streamed(client) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=60, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=60,
                                            temperature=0, stream=True)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert list(calls.values()) == [{"name": "get_time", "arguments": call.function.arguments}]
    assert reasons[-1] == "tool_calls"


def test_auto_parses_calls_out_of_free_text_and_none_leaves_them(client) -> None:
    # The 135M model rarely calls a tool on its own: a grammar makes it write text then a call, and
    # 'auto' must split them; 'none' must leave the same text alone.
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    regex = text.replace("\\", "\\\\").replace(".", "\\.").replace("{", "\\{").replace("}", "\\}")
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80,
                                          extra_body={"guided_regex": regex})
    msg = auto.choices[0].message
    assert msg.content == "Checking." and auto.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Oslo", "unit": "celsius"})]
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, stream=True,
                                            extra_body={"guided_regex": regex})
    content, names = "", []
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            names += [d.function.name for d in c.delta.tool_calls or []]
    assert content.strip() == "Checking." and names == ["get_weather"]
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=80,
                                          extra_body={"guided_regex": regex})
    assert none.choices[0].message.content == text and not none.choices[0].message.tool_calls


def test_bad_tool_requests_are_400(server) -> None:
    url = server.v1 + "/chat/completions"
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ]
    for extra, param in cases:
        r = httpx.post(url, json={"model": MODEL, "messages": ASK, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
