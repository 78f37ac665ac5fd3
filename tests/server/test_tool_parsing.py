"""Tool-call parsing and prompt rendering without a model: the parser reads back what the
renderer writes (json.dumps is the reference for the JSON), and the streaming filter yields, split
at every position, exactly what the one-shot parser gives."""

from __future__ import annotations

import json

import pytest

from kiln.entrypoints.openai.errors import APIError
from kiln.entrypoints.openai.tool_calls import (
    ToolStreamFilter, call_grammar, parse_tool_calls, parse_tools, resolve_tool_choice,
)
from kiln.entrypoints.openai.tool_prompt import inline_tools, template_knows_tools
from kiln.loader.chat_template import CHATML_FALLBACK_TEMPLATE

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = parse_tools([WEATHER, TIME])


def block(name: str, args: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def test_parse_calls_and_content() -> None:
    text = "Let me look.\n" + block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {})
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c["id"] for c in parsed.tool_calls}) == 2
    # a list inside one block, and arguments given as a JSON string
    listed = "<tool_call>" + json.dumps([{"name": "get_time", "arguments": "{}"}]) + "</tool_call>"
    assert [c["function"]["name"] for c in parse_tool_calls(listed, TOOLS).tool_calls] == ["get_time"]
    # not a call: unknown function, broken JSON, no closing tag with junk → stays content
    for text in (block("rm_rf", {}), "<tool_call>{not json</tool_call>", "plain text"):
        parsed = parse_tool_calls(text, TOOLS)
        assert parsed.tool_calls == [] and parsed.content == text


@pytest.mark.parametrize("text", [
    "Let me look.\n" + block("get_weather", {"city": "Paris"}),
    "no call here, just < and <tool and <tool_ca",
    block("get_time", {}),
])
def test_stream_filter_matches_the_one_shot_parse_at_every_split(text: str) -> None:
    whole = parse_tool_calls(text, TOOLS)
    for cut in range(len(text) + 1):
        f = ToolStreamFilter(TOOLS)
        streamed = f.feed(text[:cut]) + f.feed(text[cut:])
        tail, calls = f.finish()
        streamed += tail
        assert [c["function"] for c in calls] == [c["function"] for c in whole.tool_calls]
        if calls:
            assert streamed.strip() == (whole.content or "")
        else:
            assert streamed == text


def test_tool_choice_modes_and_errors() -> None:
    assert resolve_tool_choice(TOOLS, None) == "auto"
    assert resolve_tool_choice(TOOLS, {"type": "function", "function": {"name": "get_time"}}) == "get_time"
    assert call_grammar(TOOLS, "auto") is None and call_grammar(TOOLS, "none") is None
    assert "get_weather" in (call_grammar(TOOLS, "required").grammar or "")  # type: ignore[union-attr]
    assert "get_weather" not in (call_grammar(TOOLS, "get_time").grammar or "")  # type: ignore[union-attr]
    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        with pytest.raises(APIError):
            resolve_tool_choice(TOOLS, bad)
    for tools in ([{"type": "code"}], [{"type": "function", "function": {}}], [WEATHER, WEATHER]):
        with pytest.raises(APIError):
            parse_tools(tools)


def test_inline_rendering_for_a_template_without_tools() -> None:
    assert not template_knows_tools(CHATML_FALLBACK_TEMPLATE) and template_knows_tools("{{ tools | tojson }}")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}]
    out = inline_tools(messages, TOOLS)
    assert out[0]["role"] == "system" and json.dumps(WEATHER) in out[0]["content"]
    # the assistant's call is written in the format the parser reads back
    back = parse_tool_calls(out[2]["content"], TOOLS).tool_calls
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in back] == [("get_weather", {"city": "Oslo"})]
    assert out[3]["role"] == "user" and "<tool_response>" in out[3]["content"] and '{\\"temp\\": 3}' in out[3]["content"]
    assert "get_weather" in out[3]["content"]  # the result names its function (found through tool_call_id)
