"""Turns sampled token ids into text and RequestOutputs: detokenization, stop strings, logprobs.

Stop strings are matched on the detokenized text, so a stop string split across tokens
is caught; the text is cut before it (unless include_stop_str_in_output). While a request
runs, the last len(longest stop) - 1 characters are held back from streaming deltas, so
a client never sees the beginning of a stop string that is later removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.detokenizer import IncrementalDetokenizer
from kiln.outputs import CompletionOutput, RequestMetricsSnapshot, RequestOutput, TopLogprobs
from kiln.request import Request


@dataclass
class SequenceState:
    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[TopLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add_tokens(self, token_ids: list[int]) -> bool:
        """Detokenize new tokens and check stop strings. True when a stop string matched."""
        delta = self.detokenizer.add_tokens(token_ids)
        if self.request.is_finished:
            delta += self.detokenizer.flush()
        before = len(self.text)
        self.text += delta
        params = self.request.sampling_params
        best: tuple[int, str] | None = None
        for stop in params.stop_strings:
            idx = self.text.find(stop, max(0, before - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        self.text = self.text[: idx + len(stop)] if params.include_stop_str_in_output else self.text[:idx]
        self.finish_reason, self.stop_reason = "stop", stop
        return True

    def holdback(self) -> int:
        if self.finish_reason is not None or self.request.is_finished:
            return 0
        stops = self.request.sampling_params.stop_strings
        return max((len(s) for s in stops), default=1) - 1

    def completion(self) -> CompletionOutput:
        visible = len(self.text) - self.holdback()
        visible = max(visible, self.emitted_chars)
        text = self.text[:visible]
        delta = text[self.emitted_chars:]
        self.emitted_chars = visible
        token_ids = self.request.output_token_ids
        delta_ids = token_ids[self.emitted_tokens:]
        self.emitted_tokens = len(token_ids)
        finish = self.finish_reason or self.request.status.finish_reason
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=finish,
            stop_reason=self.stop_reason if self.finish_reason else self.request.stop_reason,
            delta_text=delta,
            delta_token_ids=delta_ids,
        )


@dataclass
class RequestState:
    """One user request: `n` sequences sharing a prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[SequenceState]
    prompt_logprobs: list[TopLogprobs | None] | None = None
    error: str | None = None
    finished_sent: bool = False
    pending: set[str] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None or s.request.is_finished for s in self.sequences)

    def to_output(self) -> RequestOutput:
        first = self.sequences[0].request.metrics
        metrics = RequestMetricsSnapshot(
            arrival_time=first.arrival_time,
            first_token_time=min((s.request.metrics.first_token_time for s in self.sequences
                                  if s.request.metrics.first_token_time is not None), default=None),
            finished_time=max((s.request.metrics.finished_time or 0.0 for s in self.sequences), default=None),
            num_cached_tokens=first.num_cached_tokens,
            num_preemptions=sum(s.request.metrics.num_preemptions for s in self.sequences),
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion() for s in self.sequences],
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            metrics=metrics,
            error=self.error,
        )
