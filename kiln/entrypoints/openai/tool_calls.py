"""Tool calling: the request's tools and tool_choice checked, the grammar that forces a call, and the
model's output parsed back into OpenAI `tool_calls`.

Output format: Hermes' (Qwen 2.5's, NousResearch's, and the one SmolLM2's function-calling data
uses): each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (a JSON list of
such objects inside one block is read too). With tool_choice "auto" the model may write text, calls
or both, and the calls are parsed out of what it wrote; "required" and a named function constrain
the output through the grammar engine to one or more calls (exactly one, of that function).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from kiln.entrypoints.openai.errors import APIError
from kiln.structured_output.params import StructuredOutputsParams

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Compact JSON inside calls: a small model allowed free whitespace may pad forever.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]
    definition: dict[str, Any]  # as the client sent it ({"type": "function", "function": {...}})


def parse_tools(tools: list[dict[str, Any]]) -> list[Tool]:
    out: list[Tool] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                f"\"parameters\": {{...}}}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"tools[{i}].function.name must be a non-empty string", param="tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        out.append(Tool(name, fn.get("description"), params, t))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise APIError(400, "tools have duplicate function names", param="tools")
    return out


def resolve_tool_choice(tools: list[Tool], choice: str | dict[str, Any] | None) -> str:
    """'none' | 'auto' | 'required' | the name of the function that must be called."""
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return "none"
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name in {t.name for t in tools}:
            return name  # type: ignore[return-value]
        raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


def call_grammar(tools: list[Tool], mode: str, parallel: bool = True) -> StructuredOutputsParams | None:
    """The grammar forcing tool calls for 'required' (any tool; one call, or with `parallel` up to one
    per tool: a small model given no bound repeats the same call until max_tokens) or a named
    function (exactly one call of it); None for 'auto' and 'none'."""
    if mode in ("auto", "none"):
        return None
    chosen = tools if mode == "required" else [t for t in tools if t.name == mode]
    options = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    schema = {"anyOf": options, "x-guidance": _COMPACT} if len(options) > 1 else {**options[0], "x-guidance": _COMPACT}
    call = f'"{CALL_OPEN}\\n" %json {json.dumps(schema)} "\\n{CALL_CLOSE}"'
    more = len(tools) - 1 if mode == "required" and parallel else 0
    repeat = ' ("\\n" call)?' * more
    return StructuredOutputsParams(grammar=f"start: call{repeat}\ncall: {call}\n")


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_tool_calls(text: str, tools: list[Tool]) -> ParsedOutput:
    """Split `text` into plain content and the calls in its <tool_call> blocks. A block that is not
    a JSON call of a known function stays in the content (the model said something, not a call)."""
    known = {t.name for t in tools}
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    rest = text
    while True:
        start = rest.find(CALL_OPEN)
        if start < 0:
            content.append(rest)
            break
        end = rest.find(CALL_CLOSE, start)
        body_end = end if end >= 0 else len(rest)
        block = rest[start + len(CALL_OPEN):body_end]
        parsed = _calls_in(block, known)
        if parsed is None:
            content.append(rest[:body_end + (len(CALL_CLOSE) if end >= 0 else 0)])
        else:
            content.append(rest[:start])
            calls.extend(parsed)
        if end < 0:
            break
        rest = rest[end + len(CALL_CLOSE):]
    joined = "".join(content).strip()
    return ParsedOutput(joined or None, calls)


def _calls_in(block: str, known: set[str]) -> list[dict[str, Any]] | None:
    try:
        value = json.loads(block.strip())
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in known:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string already
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


class ToolStreamFilter:
    """Streams content up to the first <tool_call>; from there the text is held and parsed at the end.

    A tail that could still become `<tool_call>` is held back until the next delta decides it.
    """

    def __init__(self, tools: list[Tool]) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0  # characters of `text` already streamed as content
        self.in_call = False

    def feed(self, delta: str) -> str:
        """Content to stream now for this delta."""
        self.text += delta
        if self.in_call:
            return ""
        at = self.text.find(CALL_OPEN, self.sent)
        if at >= 0:
            self.in_call = True
            out, self.sent = self.text[self.sent:at], at
            return out
        keep = _partial_prefix(self.text, CALL_OPEN)
        end = len(self.text) - keep
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to stream, the calls) once the output is complete."""
        parsed = parse_tool_calls(self.text, self.tools)
        if not parsed.tool_calls:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, []
        # content before the first call was streamed; any text after the calls is dropped, as a
        # non-streamed response would put it in `content` only when no call came before it
        return "", parsed.tool_calls


def _partial_prefix(text: str, token: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `token`."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:n]):
            return n
    return 0
