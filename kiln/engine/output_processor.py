"""From sampled token ids to RequestOutputs, one way: stop decisions, detokenization, logprobs.

The scheduler hands over the tokens each running sequence sampled in a step
(`Scheduler.update_from_output`); this module alone decides what is kept and what ends a sequence,
and tells the engine, which then has the scheduler free the finished ones (`finish_request`).

Stops, in this order for each new token of a sequence (`token_stop`): once `min_tokens` are out,
an EOS id (unless `ignore_eos`) or one of `stop_token_ids` ends it as "stop"; then `max_tokens`
and the context length end it as "length". A token stop inside a run of accepted drafts drops the
tokens after it. Stop strings are then matched on the detokenized text, so a stop string split
across tokens is caught; the text is cut before it (after it with include_stop_str_in_output),
the token ids are not, and a stop string wins over a token stop of the same step. While a
sequence runs, the last len(longest stop) - 1 characters are held back from streaming deltas, so
a client never sees the beginning of a stop string that is later removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiln.detokenizer import IncrementalDetokenizer
from kiln.outputs import CompletionOutput, RequestMetricsSnapshot, RequestOutput, TopLogprobs
from kiln.request import Request, RequestStatus

if TYPE_CHECKING:
    from kiln.loader.tokenizer import Tokenizer
    from kiln.worker.model_runner import RunnerOutput

logger = logging.getLogger("kiln")


@dataclass(frozen=True, slots=True)
class Finish:
    """Why a sequence ended: a finished RequestStatus and, for "stop", the stop token id or string."""

    status: RequestStatus
    stop_reason: int | str | None = None


def token_stop(request: Request) -> Finish | None:
    """The token-level stop after the request's last appended token, if any."""
    params = request.sampling_params
    n_out = request.num_output_tokens
    last = request.all_token_ids[-1]
    if n_out >= params.min_tokens:
        if not params.ignore_eos and last in request.eos_token_ids:
            return Finish(RequestStatus.FINISHED_STOPPED)
        if params.stop_token_ids and last in params.stop_token_ids:
            return Finish(RequestStatus.FINISHED_STOPPED, last)
    if params.max_tokens is not None and n_out >= params.max_tokens:
        return Finish(RequestStatus.FINISHED_LENGTH)
    if request.num_tokens >= request.max_model_len:
        return Finish(RequestStatus.FINISHED_LENGTH)
    return None


def append_until_stop(request: Request, tokens: Sequence[int], now: float) -> tuple[list[int], Finish | None]:
    """Append `tokens` to the request's output one at a time, up to and including the first that
    ends it. Returns the tokens kept and the token stop (None: the sequence goes on)."""
    for count, token in enumerate(tokens, start=1):
        request.append_output_token(token)
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.metrics.last_token_time = now
        stop = token_stop(request)
        if stop is not None:
            return list(tokens[:count]), stop
    return list(tokens), None


@dataclass
class SequenceState:
    """One sequence's output: text so far, what was streamed, logprobs, and how it finished."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[TopLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish: Finish | None = None
    # text length after each token of the current step (several when a step brings accepted drafts or
    # a multi-step trip): the step's output is streamed one token at a time from these
    step_ends: list[int] = field(default_factory=list)

    def add_tokens(self, token_ids: list[int], stop: Finish | None) -> Finish | None:
        """Detokenize the kept tokens of a step, then match stop strings. `stop` is the step's token
        stop; returns how the sequence finished (None: it goes on) and records it."""
        delta = self.detokenizer.add_tokens(token_ids)
        if stop is not None:
            delta += self.detokenizer.flush()
        before = len(self.text)
        self.text += delta
        params = self.request.sampling_params
        best: tuple[int, str] | None = None
        for s in params.stop_strings:
            idx = self.text.find(s, max(0, before - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            idx, s = best
            self.text = self.text[: idx + len(s)] if params.include_stop_str_in_output else self.text[:idx]
            stop = Finish(RequestStatus.FINISHED_STOPPED, s)
        self.finish = stop
        return stop

    def add_step_tokens(self, token_ids: list[int], stop: Finish | None) -> tuple[Finish | None, int]:
        """`add_tokens` for one step's kept tokens, one at a time as single steps would add them (a
        step may bring several: accepted drafts, a multi-step trip), recording the text length after
        each for streaming token by token, and ending the sequence at the token that completes a stop
        string. Returns how the sequence finished and how many of `token_ids` it used (drop the rest)."""
        self.step_ends = []
        for used, token in enumerate(token_ids, start=1):
            finish = self.add_tokens([token], stop if used == len(token_ids) else None)
            self.step_ends.append(len(self.text))
            if finish is not None:
                return finish, used
        return None, len(token_ids)

    def add_logprobs(self, tokens: list[int], entries: list[tuple[float, TopLogprobs]] | None) -> None:
        if entries is None:
            return
        if self.logprobs is None:
            self.logprobs, self.cumulative_logprob = [], 0.0
        for token, (lp, top) in zip(tokens, entries):
            self.logprobs.append(dict(top) | {token: lp})
            self.cumulative_logprob += lp  # type: ignore[operator]

    def holdback(self) -> int:
        if self.finish is not None:
            return 0
        stops = self.request.sampling_params.stop_strings
        return max((len(s) for s in stops), default=1) - 1

    def completion(self, part: int | None = None) -> CompletionOutput:
        """What is new since the last completion. `part` j (of a step that added several tokens): only
        up to the step's (j+1)-th token, not finished yet; None: everything, with the finish."""
        ends = self.step_ends
        if part is not None and part < len(ends) - 1:
            stops = self.request.sampling_params.stop_strings
            hold = max((len(s) for s in stops), default=1) - 1
            # the text may have been cut at a stop string since (a prefix of what it was then)
            visible = max(min(ends[part] - hold, len(self.text)), self.emitted_chars)
            token_ids = self.request.output_token_ids[:self.request.num_output_tokens - (len(ends) - 1 - part)]
            text = self.text[:visible]
            delta = text[self.emitted_chars:]
            self.emitted_chars = visible
            delta_ids = token_ids[self.emitted_tokens:]
            self.emitted_tokens = len(token_ids)
            logprobs = self.logprobs[:len(token_ids)] if self.logprobs is not None else None
            return CompletionOutput(index=self.index, text=text, token_ids=token_ids,
                                    cumulative_logprob=self.cumulative_logprob, logprobs=logprobs,
                                    delta_text=delta, delta_token_ids=delta_ids)
        visible = max(len(self.text) - self.holdback(), self.emitted_chars)
        text = self.text[:visible]
        delta = text[self.emitted_chars:]
        self.emitted_chars = visible
        token_ids = self.request.output_token_ids
        delta_ids = token_ids[self.emitted_tokens:]
        self.emitted_tokens = len(token_ids)
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish.status.finish_reason if self.finish else None,
            stop_reason=self.finish.stop_reason if self.finish else None,
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

    @property
    def finished(self) -> bool:
        return all(s.finish is not None for s in self.sequences)

    def to_output(self, part: int | None = None) -> RequestOutput:
        """The request's output; `part` j: only up to the j-th token of a multi-token step (SequenceState.completion)."""
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
            outputs=[s.completion(part) for s in self.sequences],
            finished=self.finished and part is None,
            prompt_logprobs=self.prompt_logprobs,
            metrics=metrics,
            error=self.error,
        )


@dataclass
class ProcessedStep:
    """What one step's outputs decided: tokens kept and sequences finished, per sequence id."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, RequestStatus] = field(default_factory=dict)
    touched: dict[str, RequestState] = field(default_factory=dict)  # requests that produced tokens, in order

    @property
    def num_generated(self) -> int:
        return sum(map(len, self.kept.values()))


class OutputProcessor:
    """Output state of every live request, keyed by request id; sequence ids map back to it.

    Invariant: a request is here from `add_request` until its last output was made (`make_outputs`
    returned it finished) or it was aborted; so is each of its sequence ids in `seq_to_request`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.seq_to_request: dict[str, str] = {}

    def has_unfinished(self) -> bool:
        return bool(self.states)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.states

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    sequences: list[Request]) -> None:
        """Track a request whose `sequences` (n of them, one index each) the scheduler now holds."""
        params = sequences[0].sampling_params
        states = [SequenceState(req, i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                               params.skip_special_tokens))
                  for i, req in enumerate(sequences)]
        state = RequestState(request_id, prompt, prompt_token_ids, states)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob
        self.states[request_id] = state
        for req in sequences:
            self.seq_to_request[req.request_id] = request_id

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns its sequence ids ([] when unknown)."""
        state = self.states.pop(request_id, None)
        if state is None:
            return []
        seq_ids = [s.request.request_id for s in state.sequences]
        for seq_id in seq_ids:
            self.seq_to_request.pop(seq_id, None)
        return seq_ids

    def _sequence(self, seq_id: str) -> tuple[RequestState, SequenceState] | None:
        rid = self.seq_to_request.get(seq_id)
        state = self.states.get(rid) if rid else None
        if state is None:
            return None
        return state, next(s for s in state.sequences if s.request.request_id == seq_id)

    def process(self, scheduled: Sequence[str], new_tokens: dict[str, list[int]], result: RunnerOutput
                ) -> ProcessedStep:
        """Decide one step: for each scheduled sequence (in schedule order), record prompt logprobs,
        keep its new tokens up to a token stop (appending them to the request), record their
        logprobs, detokenize them and match stop strings.

        The engine must then finish `step.finished` in the scheduler and call `make_outputs(step)`.
        A failure in one sequence's detokenization finishes that sequence with an error only.
        """
        step = ProcessedStep()
        now = time.monotonic()
        for seq_id in scheduled:
            found = self._sequence(seq_id)
            if found is None:
                continue
            state, seq = found
            if seq_id in result.prompt_logprobs and state.prompt_logprobs is not None and seq.index == 0:
                for token, lp, top in result.prompt_logprobs[seq_id]:
                    state.prompt_logprobs.append(dict(top) | {token: lp})
            tokens = new_tokens.get(seq_id)
            if not tokens:
                continue
            kept, stop = append_until_stop(seq.request, tokens, now)
            try:
                finish, used = seq.add_step_tokens(kept, stop)
                if used < len(kept):  # a stop string ended inside a multi-token step: drop what follows it
                    del seq.request.all_token_ids[used - len(kept):]
                    kept = kept[:used]
            except Exception as exc:  # one request's failure must not take down the batch
                logger.exception("request %s failed in output processing", seq_id)
                state.error = f"{type(exc).__name__}: {exc}"
                # a token stop decided before the failure stands; otherwise the sequence ends in error
                finish = seq.finish = stop or Finish(RequestStatus.FINISHED_ERROR)
            step.kept[seq_id] = kept
            lps = result.logprobs.get(seq_id)
            seq.add_logprobs(kept, lps[: len(kept)] if lps else lps)
            if finish is not None:
                step.finished[seq_id] = finish.status
            step.touched[state.request_id] = state
        return step

    def make_outputs(self, step: ProcessedStep) -> tuple[list[RequestOutput], list[str]]:
        """One RequestOutput per request that produced tokens in `step`. Finished requests are
        forgotten; their sequence ids come back second, for the engine to release."""
        outputs: list[RequestOutput] = []
        released: list[str] = []
        for rid, state in step.touched.items():
            # one output per token, so streams keep one-token granularity when a step brought several
            parts = max(len(seq.step_ends) for seq in state.sequences)
            for part in range(parts - 1):
                outputs.append(state.to_output(part))
            out = state.to_output()
            outputs.append(out)
            for seq in state.sequences:
                seq.step_ends = []
            if out.finished:
                released.extend(self.abort_request(rid))
        return outputs, released
