"""Putting tools, tool calls and tool results into a chat prompt.

A chat template that knows tools (its source uses `tools`) gets them the way transformers'
`apply_chat_template(messages, tools=...)` passes them: `tools` as the list of
{"type": "function", "function": {...}} definitions, assistant `tool_calls` with their
`function.arguments` as a dict (the client sends a JSON string), `role: "tool"` messages with
`tool_call_id` and `content` as they are.

A template that does not (SmolLM2-135M-Instruct's, ChatML-only) would drop them silently, so kiln
writes them into the conversation itself, in the Hermes format the parser reads back
(kiln.entrypoints.openai.tool_calls): the definitions inside <tools></tools> in the system message
with the instruction to answer with <tool_call> blocks; earlier assistant calls as <tool_call>
blocks in that message's content; tool results as user turns wrapped in <tool_response>.
"""

from __future__ import annotations

import json
from typing import Any

from kiln.entrypoints.openai.tool_calls import CALL_CLOSE, CALL_OPEN, Tool


def template_knows_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def for_tool_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """transformers' message contract: tool call arguments as dicts."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_with_dict_arguments(c) for c in m["tool_calls"]]}
        out.append(m)
    return out


def _with_dict_arguments(call: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ValueError('each tool call must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}')
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            pass  # leave what the client sent; the template prints it as it is
    return {**call, "function": fn}


def system_text(tools: list[Tool]) -> str:
    defs = "\n".join(json.dumps(t.definition, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{defs}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n{CALL_OPEN}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n' + CALL_CLOSE)


def inline_tools(messages: list[dict[str, Any]], tools: list[Tool]) -> list[dict[str, Any]]:
    """Messages for a template without tool support, with tools, calls and results written in."""
    out: list[dict[str, Any]] = []
    names = {}  # tool_call_id → function name, for results that do not repeat it
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            blocks = []
            for call in m["tool_calls"]:
                fn = _with_dict_arguments(call)["function"]
                names[call.get("id")] = fn.get("name")
                blocks.append(f"{CALL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': fn.get('arguments')}, ensure_ascii=False)}\n{CALL_CLOSE}")
            text = ((m.get("content") or "") + "\n" if m.get("content") else "") + "\n".join(blocks)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id"))
            body = json.dumps({"name": name, "content": m.get("content") or ""}, ensure_ascii=False) if name else (m.get("content") or "")
            text = f"<tool_response>\n{body}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text  # several results of one turn: one user message
            else:
                out.append({"role": "user", "content": text, "_tool_results": True})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system_text(tools)}
        else:
            out.insert(0, {"role": "system", "content": system_text(tools)})
    return out
