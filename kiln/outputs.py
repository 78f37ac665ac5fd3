"""What the engine hands back to callers (vLLM-compatible names, plus streaming deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens if self.metrics else 0
