"""POST /v1/chat/completions: messages → chat template → engine → chat.completion (or SSE chunks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from contextlib import aclosing
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.entrypoints.openai.errors import APIError
from kiln.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from kiln.entrypoints.openai.structured import structured_field
from kiln.entrypoints.openai.tool_calls import Tool, ToolStreamFilter, call_grammar, parse_tool_calls, parse_tools, resolve_tool_choice
from kiln.entrypoints.openai.tool_prompt import for_tool_template, inline_tools, template_knows_tools
from kiln.entrypoints.openai.serving_common import (
    SSE_DONE, ServingContext, add_requests, check_params, clamp, holding, new_logprobs, open_stream_slot, outputs,
    reject_unsupported, resolve_max_tokens, sampling_params, sse, stream_error_event, top_entries, until_disconnect,
    usage,
)
from kiln.outputs import RequestOutput, TopLogprobs


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Pydantic messages → the dicts chat templates expect (text parts joined, developer → system)."""
    if not messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400, f"messages[{i}].content[{j}]: only text parts are supported, got type {part.get('type')!r}",
                        param=f"messages[{i}].content",
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, key) is not None:
                msg[key] = getattr(m, key)
        out.append(msg)
    return out


def chat_logprobs(ctx: ServingContext, token_ids: list[int], entries: list[TopLogprobs], k: int) -> list[dict[str, Any]]:
    content = []
    for tid, entry in zip(token_ids, entries):
        text, raw = ctx.piece(tid)
        top = [{"token": ctx.piece(t)[0], "logprob": clamp(lp), "bytes": ctx.piece(t)[1]} for t, lp in top_entries(entry, k)]
        content.append({"token": text, "logprob": clamp(entry.get(tid, -9999.0)), "bytes": raw, "top_logprobs": top})
    return content


def _check_supported(req: ChatCompletionRequest, ctx: ServingContext) -> tuple[list[Tool], str]:
    """The request's tools and its tool mode ('none', 'auto', 'required' or a function name)."""
    reject_unsupported(req, ctx.limits)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tools = parse_tools(req.tools or [])
    mode = resolve_tool_choice(tools, req.tool_choice)
    if mode not in ("none", "auto") and structured_field(req) is not None:
        raise APIError(400, f"tool_choice {req.tool_choice!r} constrains the output already; remove "
                            f"{structured_field(req)}", param="tool_choice")
    return tools, mode


def render_chat(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool = True,
                tools: list[Tool] | None = None) -> str:
    plain = plain_messages(messages)
    extra = {}
    try:
        if template_knows_tools(ctx.tokenizer.chat_template):
            plain = for_tool_template(plain)
            if tools:
                extra["tools"] = [t.definition for t in tools]
        elif tools or any(m.get("tool_calls") or m["role"] == "tool" for m in plain):
            plain = inline_tools(plain, tools or [])  # the template would drop tools: kiln writes them in
        return ctx.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, **extra)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    except Exception as exc:  # jinja2.TemplateError, or a template tripping over odd input
        raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request) -> Response:
    lora = ctx.check_model(req.model)
    tools, mode = _check_supported(req, ctx)
    text = render_chat(ctx, req.messages, tools=tools)
    # The template already holds any BOS the model wants.
    prompt = ctx.process_prompt(text, ctx.tokenizer.encode(text, add_special_tokens=False), param="messages")
    prompt_len = len(prompt.token_ids)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(ctx, getattr(req, field), field, prompt_len, req.n)
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    forced = call_grammar(tools, mode, req.parallel_tool_calls is not False)
    if forced is not None:
        params = replace(params, structured_outputs=forced)
    check_params(ctx, req, params)
    parse = tools if mode != "none" else []
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    slot = open_stream_slot(ctx, raw) if req.stream else None
    try:
        queue = add_requests(ctx, [prompt], [params], [rid], lora)
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    results = outputs(ctx, queue, [rid])
    if slot is not None:
        def finish() -> None:
            ctx.engine.abort(rid)
            slot.release()

        return StreamingResponse(
            holding(slot, _stream(ctx, req, rid, results, prompt_len, parse)), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"}, background=BackgroundTask(finish),
        )
    final = await until_disconnect(raw, _last(results))
    return JSONResponse(_response(ctx, req, rid, final, prompt_len, parse))


async def _last(results: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async with aclosing(results):
        async for out in results:
            last = out
    assert last is not None
    return last


def _message(text: str, finish_reason: str | None, tools: list[Tool]) -> tuple[dict[str, Any], str | None]:
    """The assistant message of one choice, tool calls parsed out of the text when tools are on."""
    if not tools:
        return {"role": "assistant", "content": text}, finish_reason
    parsed = parse_tool_calls(text, tools)
    if not parsed.tool_calls:
        return {"role": "assistant", "content": text}, finish_reason
    reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return {"role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls}, reason


def _response(ctx: ServingContext, req: ChatCompletionRequest, rid: str, final: RequestOutput, prompt_len: int,
              tools: list[Tool]) -> dict:
    if final.error is not None:
        raise APIError(500, final.error, "server_error")
    k = req.top_logprobs or 0
    choices = []
    for o in final.outputs:
        message, reason = _message(o.text, o.finish_reason, tools)
        choices.append({
            "index": o.index,
            "message": message,
            "logprobs": {"content": chat_logprobs(ctx, o.token_ids, o.logprobs or [], k)} if req.logprobs else None,
            "finish_reason": reason,
        })
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": req.model or ctx.model_name,
        "choices": choices, "usage": usage(prompt_len, sum(len(o.token_ids) for o in final.outputs)),
    }


async def _stream(
    ctx: ServingContext, req: ChatCompletionRequest, rid: str, results: AsyncIterator[RequestOutput], prompt_len: int,
    tools: list[Tool],
) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model or ctx.model_name}

    def chunk(choices: list[dict[str, Any]]) -> str:
        return sse({**base, "choices": choices, **({"usage": None} if include_usage else {})})

    k = req.top_logprobs or 0
    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(req.n)])
    completion_tokens, done = 0, set()
    filters = {i: ToolStreamFilter(tools) for i in range(req.n)} if tools else {}
    async with aclosing(results):
        async for out in results:
            if out.error is not None:
                yield stream_error_event(out.error)
                break
            choices = []
            for o in out.outputs:
                if o.index in done:
                    continue
                completion_tokens += len(o.delta_token_ids)
                lps = new_logprobs(o.token_ids, o.delta_token_ids, o.logprobs) if req.logprobs else []
                if not (o.delta_text or o.finish_reason or lps):
                    continue
                if o.finish_reason:
                    done.add(o.index)
                delta: dict[str, Any] = {"content": o.delta_text} if o.delta_text else {}
                reason = o.finish_reason
                if filters:
                    delta, reason = _tool_delta(filters[o.index], o.delta_text, o.finish_reason)
                choices.append({
                    "index": o.index,
                    "delta": delta,
                    "logprobs": {"content": chat_logprobs(ctx, o.delta_token_ids, lps, k)} if req.logprobs else None,
                    "finish_reason": reason,
                })
            if choices:
                yield chunk(choices)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(prompt_len, completion_tokens)})
    yield SSE_DONE


def _tool_delta(flt: ToolStreamFilter, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """One streamed delta with tools on: content until a <tool_call> starts, then nothing until the
    end, where the calls come whole (OpenAI's delta format: index, id, type, name, arguments)."""
    content = flt.feed(text)
    if not finish_reason:
        return ({"content": content} if content else {}), None
    tail, calls = flt.finish()
    content += tail
    delta: dict[str, Any] = {"content": content} if content else {}
    if not calls:
        return delta, finish_reason
    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
    return delta, "tool_calls" if finish_reason == "stop" else finish_reason
