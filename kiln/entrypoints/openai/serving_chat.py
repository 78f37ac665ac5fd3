"""POST /v1/chat/completions: messages → chat template → engine → chat.completion (or SSE chunks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.entrypoints.openai.errors import APIError
from kiln.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage
from kiln.entrypoints.openai.serving_common import (
    SSE_DONE, ServingContext, add_requests, clamp, holding, new_logprobs, open_stream_slot, outputs,
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


def _check_supported(req: ChatCompletionRequest, ctx: ServingContext) -> None:
    reject_unsupported(req, ctx.limits)
    if req.tools:
        raise APIError(400, "tools (function calling) are not supported by kiln yet; remove `tools`", param="tools")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise APIError(400, f"response_format {fmt!r} is not supported; only 'text'", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def render_chat(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    plain = plain_messages(messages)
    try:
        return ctx.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    except Exception as exc:  # jinja2.TemplateError, or a template tripping over odd input
        raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request) -> Response:
    ctx.check_model(req.model)
    _check_supported(req, ctx)
    text = render_chat(ctx, req.messages)
    # The template already holds any BOS the model wants.
    prompt = ctx.process_prompt(text, ctx.tokenizer.encode(text, add_special_tokens=False), param="messages")
    prompt_len = len(prompt.token_ids)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(ctx, getattr(req, field), field, prompt_len, req.n)
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    slot = open_stream_slot(ctx, raw) if req.stream else None
    try:
        queue = add_requests(ctx, [prompt], [params], [rid])
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
            holding(slot, _stream(ctx, req, rid, results, prompt_len)), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"}, background=BackgroundTask(finish),
        )
    final = await until_disconnect(raw, _last(results))
    return JSONResponse(_response(ctx, req, rid, final, prompt_len))


async def _last(results: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async with aclosing(results):
        async for out in results:
            last = out
    assert last is not None
    return last


def _response(ctx: ServingContext, req: ChatCompletionRequest, rid: str, final: RequestOutput, prompt_len: int) -> dict:
    if final.error is not None:
        raise APIError(500, final.error, "server_error")
    k = req.top_logprobs or 0
    choices = [
        {
            "index": o.index,
            "message": {"role": "assistant", "content": o.text},
            "logprobs": {"content": chat_logprobs(ctx, o.token_ids, o.logprobs or [], k)} if req.logprobs else None,
            "finish_reason": o.finish_reason,
        }
        for o in final.outputs
    ]
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name,
        "choices": choices, "usage": usage(prompt_len, sum(len(o.token_ids) for o in final.outputs)),
    }


async def _stream(
    ctx: ServingContext, req: ChatCompletionRequest, rid: str, results: AsyncIterator[RequestOutput], prompt_len: int
) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": ctx.model_name}

    def chunk(choices: list[dict[str, Any]]) -> str:
        return sse({**base, "choices": choices, **({"usage": None} if include_usage else {})})

    k = req.top_logprobs or 0
    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(req.n)])
    completion_tokens, done = 0, set()
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
                choices.append({
                    "index": o.index,
                    "delta": {"content": o.delta_text} if o.delta_text else {},
                    "logprobs": {"content": chat_logprobs(ctx, o.delta_token_ids, lps, k)} if req.logprobs else None,
                    "finish_reason": o.finish_reason,
                })
            if choices:
                yield chunk(choices)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(prompt_len, completion_tokens)})
    yield SSE_DONE
