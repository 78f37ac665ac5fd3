"""POST /v1/completions: one or many prompts (text or token ids) → text_completion (or SSE chunks).

With several prompts each is its own engine request (they batch in the same steps); choice
`index` is prompt_index * n + sequence_index, as in the OpenAI API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.engine.llm_engine import TokenizedPrompt
from kiln.entrypoints.openai.errors import APIError
from kiln.entrypoints.openai.protocol import CompletionRequest
from kiln.entrypoints.openai.serving_common import (
    SSE_DONE, ServingContext, add_requests, check_params, clamp, holding, new_logprobs, open_stream_slot, outputs,
    reject_unsupported, resolve_max_tokens, sampling_params, sse, stream_error_event, top_entries, until_disconnect,
    usage,
)
from kiln.outputs import RequestOutput, TopLogprobs


def _prompts(ctx: ServingContext, prompt: str | list[str] | list[int] | list[list[int]]) -> list[TokenizedPrompt]:
    """Each prompt tokenized (or decoded, for echo) and validated once; every `text` is set."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty: give a string, a list of strings, or token ids", param="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            p = ctx.process_prompt(item, ctx.tokenizer.encode(item, add_special_tokens=True))
        else:
            p = ctx.process_prompt(None, list(item))  # range-checks the ids before they are decoded
            p = replace(p, text=ctx.tokenizer.decode(p.token_ids))
        out.append(p)
    return out


class _Logprobs:
    """OpenAI's legacy logprobs object for one choice, grown token by token."""

    def __init__(self, ctx: ServingContext, k: int) -> None:
        self.ctx, self.k, self.offset = ctx, k, 0

    def build(self, token_ids: list[int], entries: list[TopLogprobs | None]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(token_ids, entries):
            text = self.ctx.piece(tid)[0]
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            out["token_logprobs"].append(None if entry is None else clamp(entry.get(tid, -9999.0)))
            out["top_logprobs"].append(
                None if entry is None else {self.ctx.piece(t)[0]: clamp(lp) for t, lp in top_entries(entry, self.k)}
            )
        return out


def _merge(a: dict[str, list] | None, b: dict[str, list]) -> dict[str, list]:
    return b if a is None else {key: a[key] + b[key] for key in a}


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    lora = ctx.check_model(req.model)
    reject_unsupported(req, ctx.limits)
    if req.suffix:
        raise APIError(400, "suffix is not supported by kiln; remove it", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported by kiln (it must equal n or be omitted)", param="best_of")
    prompts = _prompts(ctx, req.prompt)
    prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
    params = [
        sampling_params(req, resolve_max_tokens(ctx, req.max_tokens, "max_tokens", len(p.token_ids), req.n), req.logprobs,
                        prompt_lp)
        for p in prompts
    ]
    check_params(ctx, req, params[0])  # every prompt has the same grammar and logit_bias
    cid = f"cmpl-{uuid.uuid4().hex}"
    ids = [f"{cid}-{i}" for i in range(len(prompts))]
    slot = open_stream_slot(ctx, raw) if req.stream else None
    try:
        queue = add_requests(ctx, prompts, params, ids, lora)
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    results = outputs(ctx, queue, ids)
    state = _Choices(ctx, req, prompts, ids)
    if slot is not None:
        def finish() -> None:
            for rid in ids:
                ctx.engine.abort(rid)
            slot.release()

        return StreamingResponse(
            holding(slot, _stream(ctx, req, cid, state, results)), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"}, background=BackgroundTask(finish),
        )
    finals = await until_disconnect(raw, _finals(results))
    for final in finals.values():
        if final.error is not None:
            raise APIError(500, final.error, "server_error")
    choices = []
    for rid, final in finals.items():
        for o in final.outputs:
            choices.append(state.choice(rid, o.index, o.text, o.token_ids, o.logprobs, final.prompt_logprobs, o.finish_reason))
    choices.sort(key=lambda c: c["index"])
    return JSONResponse({
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": req.model or ctx.model_name,
        "choices": choices, "usage": usage(state.prompt_tokens, sum(len(o.token_ids) for f in finals.values() for o in f.outputs)),
    })


async def _finals(results: AsyncIterator[RequestOutput]) -> dict[str, RequestOutput]:
    finals: dict[str, RequestOutput] = {}
    async with aclosing(results):
        async for out in results:
            if out.finished:
                finals[out.request_id] = out
    return finals


class _Choices:
    """Per-choice bookkeeping: echo sent yet, logprob offsets, finished."""

    def __init__(self, ctx: ServingContext, req: CompletionRequest, prompts: list[TokenizedPrompt], ids: list[str]) -> None:
        self.ctx, self.req, self.prompts = ctx, req, prompts
        self.position = {rid: i for i, rid in enumerate(ids)}
        self.echoed: set[int] = set()
        self.done: set[int] = set()
        self.logprobs: dict[int, _Logprobs] = {}
        self.prompt_tokens = sum(len(p.token_ids) for p in prompts)

    def index(self, rid: str, seq: int) -> int:
        return self.position[rid] * self.req.n + seq

    def choice(
        self, rid: str, seq: int, text: str, token_ids: list[int], logprobs: list[TopLogprobs] | None,
        prompt_logprobs: list[TopLogprobs | None] | None, finish_reason: str | None,
    ) -> dict[str, Any]:
        index = self.index(rid, seq)
        prompt = self.prompts[self.position[rid]]
        lp: dict[str, list] | None = None
        tracker = self.logprobs.setdefault(index, _Logprobs(self.ctx, self.req.logprobs or 0))
        if self.req.echo and index not in self.echoed:
            self.echoed.add(index)
            text = (prompt.text or "") + text
            if self.req.logprobs is not None:
                entries = list(prompt_logprobs or [])
                entries += [None] * (len(prompt.token_ids) - len(entries))
                lp = tracker.build(prompt.token_ids, entries)
        if self.req.logprobs is not None:
            lp = _merge(lp, tracker.build(token_ids, list(logprobs or [])))
        if finish_reason:
            self.done.add(index)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}


async def _stream(
    ctx: ServingContext, req: CompletionRequest, cid: str, state: _Choices, results: AsyncIterator[RequestOutput]
) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": req.model or ctx.model_name}
    completion_tokens = 0
    async with aclosing(results):
        async for out in results:
            if out.error is not None:
                yield stream_error_event(out.error)
                break
            choices = []
            for o in out.outputs:
                index = state.index(out.request_id, o.index)
                if index in state.done:
                    continue
                completion_tokens += len(o.delta_token_ids)
                lps = new_logprobs(o.token_ids, o.delta_token_ids, o.logprobs) if req.logprobs is not None else []
                first_echo = req.echo and index not in state.echoed
                if not (o.delta_text or o.finish_reason or lps or first_echo):
                    continue
                choices.append(state.choice(out.request_id, o.index, o.delta_text, o.delta_token_ids, lps,
                                            out.prompt_logprobs, o.finish_reason))
            if choices:
                yield sse({**base, "choices": choices, **({"usage": None} if include_usage else {})})
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(state.prompt_tokens, completion_tokens)})
    yield SSE_DONE
