"""What the engine hands back to callers (vLLM-compatible names, plus streaming deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

TopLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TopLogprobs] | None = None  # per token: {token_id: logprob}, sampled token included
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # kiln extras for streaming: what is new since the previous RequestOutput of this request
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetricsSnapshot:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    num_cached_tokens: int
    num_preemptions: int

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TopLogprobs | None] | None = None
    metrics: RequestMetricsSnapshot | None = None
    error: str | None = None
    # the engine step that made it (None: not known); a step that brought several tokens (a multi-step
    # trip, accepted drafts) makes one output per token, all with the same step
    engine_step: int | None = None

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens if self.metrics else 0


def merge_request_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One RequestOutput standing for two consecutive ones of the same request.

    Cumulative fields (text, token_ids, logprobs, finish state) come from `later`; the streaming
    deltas are concatenated, so a consumer that fell behind can send both steps' tokens as one
    chunk without losing any. `earlier` must not be finished (nothing follows a finished output).
    """
    if earlier.request_id != later.request_id or earlier.finished:
        raise ValueError("only consecutive outputs of one unfinished request can be merged")
    before = {o.index: o for o in earlier.outputs}
    merged = []
    for o in later.outputs:
        prev = before.get(o.index)
        if prev is None:
            merged.append(o)
            continue
        merged.append(replace(o, delta_text=prev.delta_text + o.delta_text,
                              delta_token_ids=prev.delta_token_ids + o.delta_token_ids))
    return replace(later, outputs=merged)


def coalesce_outputs(pending: list[RequestOutput]) -> list[RequestOutput]:
    """Merge queued outputs per request (in arrival order of each request's first one) — unless they
    all come from one engine step: then the consumer is not behind, they are one step's tokens (a
    multi-step trip) and stay one output, so one chunk, per token."""
    by_request: dict[str, list[RequestOutput]] = {}
    for out in pending:
        by_request.setdefault(out.request_id, []).append(out)
    result: list[RequestOutput] = []
    for outs in by_request.values():
        steps = {o.engine_step for o in outs}
        if len(outs) > 1 and len(steps) == 1 and None not in steps:
            result.extend(outs)
            continue
        merged = outs[0]
        for out in outs[1:]:
            merged = merge_request_outputs(merged, out)
        result.append(merged)
    return result
