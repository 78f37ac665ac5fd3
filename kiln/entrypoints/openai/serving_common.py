"""What chat and completions share: model check, SamplingParams from a request, token budgets,
logprob formatting, SSE framing, and consuming engine outputs with abort-on-disconnect."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.requests import Request

from kiln.detokenizer import token_bytes
from kiln.engine.async_engine import AsyncEngine
from kiln.engine.llm_engine import TokenizedPrompt
from kiln.entrypoints.openai.errors import APIError, bad_value
from kiln.entrypoints.openai.limits import (
    ServerLimits, StreamSlot, StreamSlots, api_key_of, check_n_and_stops, check_request_tokens, request_token_room,
)
from kiln.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from kiln.entrypoints.openai.structured import logit_bias, structured_field, structured_spec
from kiln.lora.request import LoRARequest
from kiln.outputs import RequestOutput, TopLogprobs, coalesce_outputs
from kiln.sampling_params import SamplingParams

T = TypeVar("T")

KNOWN_PARAMS = frozenset(
    set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields) | {"prompt", "messages"}
)

# JSON has no -inf; OpenAI-compatible servers clamp to this.
_MIN_LOGPROB = -9999.0


class ServingContext:
    """The engine, the served name and a few cached facts, shared by every endpoint."""

    def __init__(self, engine: AsyncEngine, model_name: str, limits: ServerLimits | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.limits = limits or ServerLimits()
        self.streams = StreamSlots(self.limits.max_streams_per_key)
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    def check_model(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base model); 404 for a name this server lacks."""
        if name is None or name == self.model_name:
            return None
        adapters = self.engine.engine.list_loras()
        if name in adapters:
            return LoRARequest(name)
        served = ", ".join(f"`{n}`" for n in [self.model_name, *adapters])
        raise APIError(
            404, f"The model `{name}` does not exist. This server serves {served} (see GET /v1/models).",
            param="model", code="model_not_found",
        )

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text (U+FFFD for part of a character) and its exact bytes, for logprobs."""
        cached = self._pieces.get(token_id)
        if cached is None:
            raw = token_bytes(self.tokenizer, token_id)
            cached = self._pieces[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return cached

    def process_prompt(self, text: str | None, token_ids: list[int], param: str = "prompt") -> TokenizedPrompt:
        """Validate tokens the endpoint made (or was given) once, into the TokenizedPrompt the engine
        takes as it is; a bad prompt is a 400 naming `param`."""
        try:
            return self.engine.engine.process_prompt({"prompt": text, "prompt_token_ids": token_ids})
        except ValueError as exc:
            raise APIError(400, str(exc), param=param, code="context_length_exceeded"
                           if len(token_ids) >= self.engine.max_model_len else None) from None


def reject_unsupported(req: SamplingFields, limits: ServerLimits | None = None) -> None:
    if limits is not None:
        check_n_and_stops(limits, req.n, req.stop)
    # torch generators take 64-bit seeds; a bigger one would only fail later, inside a step.
    if req.seed is not None and not -(1 << 63) <= req.seed < (1 << 64):
        raise APIError(400, f"seed must fit in 64 bits; got {req.seed}", param="seed")


def resolve_max_tokens(ctx: ServingContext, requested: int | None, field: str, prompt_len: int, n: int = 1) -> int:
    """The output budget per choice: what was asked for, or all the room the context (and the
    server's per-request token budget, shared by the n choices) leaves."""
    limit = ctx.engine.max_model_len
    room = limit - prompt_len
    budget_room = request_token_room(ctx.limits, prompt_len, n, field)
    if requested is None:
        return room if budget_room is None else min(room, budget_room)
    if requested >= 1 and requested > room:
        raise APIError(
            400,
            f"This model's context length is {limit} tokens; the prompt is {prompt_len} tokens and {field} is "
            f"{requested}, {prompt_len + requested} in all. Lower {field} or shorten the prompt.",
            param=field, code="context_length_exceeded",
        )
    check_request_tokens(ctx.limits, prompt_len, n, requested, field)
    return requested


def open_stream_slot(ctx: ServingContext, request: Request) -> StreamSlot:
    """A place among the API key's open streams (429 when they are all taken); take it before the
    request is queued, so a refused stream costs the engine nothing."""
    return ctx.streams.acquire(api_key_of(request.scope["headers"]))


async def holding(slot: StreamSlot, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`, releasing `slot` when they end, fail or are abandoned."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    finally:
        slot.release()


def sampling_params(
    req: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    """SamplingParams from the request; OpenAI's defaults where a field is null or absent."""
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    try:
        return SamplingParams(
            n=req.n,
            temperature=pick(req.temperature, 1.0),
            top_p=pick(req.top_p, 1.0),
            top_k=pick(req.top_k, 0),
            min_p=pick(req.min_p, 0.0),
            presence_penalty=pick(req.presence_penalty, 0.0),
            frequency_penalty=pick(req.frequency_penalty, 0.0),
            repetition_penalty=pick(req.repetition_penalty, 1.0),
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            num_speculative_tokens=req.num_speculative_tokens,
            structured_outputs=structured_spec(req),
            logit_bias=logit_bias(req),
        )
    except ValueError as exc:
        raise bad_value(exc, KNOWN_PARAMS) from None


def check_params(ctx: ServingContext, req: SamplingFields, params: SamplingParams) -> None:
    """The checks that need the model (logit_bias ids, the grammar compiled): a 400 on the field,
    before anything is queued."""
    try:
        ctx.engine.engine.validate_params(params)
    except ValueError as exc:
        field = "logit_bias" if str(exc).startswith("logit_bias") else structured_field(req)
        raise APIError(400, str(exc), param=field) from None


def clamp(lp: float) -> float:
    return lp if not math.isnan(lp) and lp > _MIN_LOGPROB else _MIN_LOGPROB


def top_entries(entry: TopLogprobs, k: int) -> list[tuple[int, float]]:
    """The k most likely alternatives of one position, best first."""
    return sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k] if k > 0 else []


def new_logprobs(token_ids: list[int], delta_ids: list[int], logprobs: list[TopLogprobs] | None) -> list[TopLogprobs]:
    """The logprob entries of the tokens in this delta."""
    if not logprobs or not delta_ids:
        return []
    start = len(token_ids) - len(delta_ids)
    return logprobs[start : len(token_ids)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def stream_error_event(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def outputs(ctx: ServingContext, queue: asyncio.Queue, request_ids: list[str]) -> AsyncIterator[RequestOutput]:
    """Outputs of several requests that share `queue`, until all finished; leaving early aborts the rest."""
    unfinished = set(request_ids)
    try:
        while unfinished:
            pending: list[RequestOutput] = [await queue.get()]
            # A consumer that fell behind the engine (many streams on few cores) sends what has
            # queued up as one chunk per request instead of one per step: fewer JSON encodes and
            # socket writes exactly when the server is busiest. No token is dropped.
            while not queue.empty():
                pending.append(queue.get_nowait())
            for out in coalesce_outputs(pending):
                if out.finished:
                    unfinished.discard(out.request_id)
                yield out
    finally:
        for rid in unfinished:
            ctx.engine.abort(rid)


def add_requests(ctx: ServingContext, prompts: list[TokenizedPrompt], params: list[SamplingParams],
                 ids: list[str], lora: LoRARequest | None = None) -> asyncio.Queue:
    """Queue every prompt or none (with adapter `lora`): if one is refused, the ones already queued are aborted."""
    queue: asyncio.Queue = asyncio.Queue()
    added: list[str] = []
    try:
        for prompt, p, rid in zip(prompts, params, ids):
            ctx.engine.add_request(prompt, p, rid, queue=queue, lora_request=lora)
            added.append(rid)
    except ValueError as exc:
        for rid in added:
            ctx.engine.abort(rid)
        raise bad_value(exc, KNOWN_PARAMS) from None
    except BaseException:
        for rid in added:
            ctx.engine.abort(rid)
        raise
    return queue


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client hangs up first (its finally-blocks abort the requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is cancelling this request: take the work down too
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise APIError(499, "client closed the request", code="client_closed_request")


async def _disconnected(request: Request) -> None:
    # The body has been read already, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
