"""Iteration-level scheduler: one token budget per step, no prefill/decode phases.

Each step, running requests are served first (a decode needs one token; an unfinished
prompt needs its next chunk), then waiting requests are admitted while the budget,
`max_num_seqs` and free KV blocks allow. Chunked prefill, prefix-cache hits and decode
all fall out of "give each request the tokens it still needs to compute, up to the
budget". When blocks run out, the newest running request (lowest priority first) is
preempted by recompute: its blocks are freed, its progress reset, and it goes back to
the front of the waiting queue with its output so far.

The scheduler never touches tensors; it emits a SchedulerOutput for the model runner
and is told the sampled tokens back via `update_from_output`. It never decides that a request
is done: the engine's output processor does (token stops and stop strings), and the engine
then calls `finish_request`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kiln.config import SchedulerConfig
from kiln.core.kv_cache_manager import KVCacheManager
from kiln.request import Request, RequestStatus


class Admission(Protocol):
    """A gate on starting a waiting request beside the KV cache (the LoRA manager: its adapter needs a
    slot). `try_admit` holds what the request needs or says no (the request waits, FCFS); `release`
    drops the hold when the request is preempted or finished, and is idempotent."""

    def try_admit(self, request: Request) -> bool: ...

    def release(self, request: Request) -> None: ...


def _urgency(request: Request) -> tuple[int, float]:
    """Scheduling order: lower priority value first, then earlier arrival (preemption takes the max)."""
    return request.priority, request.arrival_time


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: compute `num_tokens` tokens starting at `start`."""

    request: Request  # read-only for the runner
    start: int  # = request.num_computed_tokens at scheduling time
    num_tokens: int  # new tokens computed this step (prompt chunk, 1 decode token, or 1 + drafts)
    block_ids: list[int] | list[list[int]]  # one list per layer group under a hybrid cache (kv_cache_groups)
    spec_token_ids: list[int] = field(default_factory=list)
    # > 0: a multi-step decode trip (kiln.engine.multi_step) of up to 1 + lookahead steps, whose
    # block ids cover that many tokens; every token it samples but the last has its KV computed
    lookahead: int = 0

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a token is sampled."""
        return self.start + self.num_tokens - len(self.spec_token_ids) >= self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_ids: list[str]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.admission: Admission | None = None  # set by the engine when it serves LoRA adapters

    # ---- queue management -------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request, ordered by (priority, arrival): lower priority value runs first."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        key = (request.priority, request.arrival_time)
        index = len(self.waiting)
        while index > 0 and (self.waiting[index - 1].priority, self.waiting[index - 1].arrival_time) > key \
                and self.waiting[index - 1].status == RequestStatus.WAITING:
            index -= 1
        self.waiting.insert(index, request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (stop / abort / error) a request in any state; frees its KV blocks. Idempotent."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        request.metrics.finished_time = time.monotonic()
        self.kv.free(request)
        if self.admission is not None:
            self.admission.release(request)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- scheduling -----------------------------------------------------------------
    def _tokens_needed(self, request: Request) -> int:
        return request.num_tokens + len(request.spec_token_ids) - request.num_computed_tokens

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        if self.admission is not None:
            self.admission.release(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.spec_token_ids = []
        victim.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _pick_victim(self, first_unscheduled: int) -> Request:
        """The least urgent (largest priority value, then newest) running request not yet scheduled
        in this step: `running[first_unscheduled:]`, which holds the request that needs the blocks.
        A request scheduled earlier in the step is never the victim (its SchedulerOutput entry would
        point at freed blocks); with `running` in urgency order this is also the least urgent overall."""
        return max(self.running[first_unscheduled:], key=_urgency)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        now = time.monotonic()

        # Serve running requests in (priority, arrival) order, so the budget goes to the most urgent
        # first and a victim (the least urgent not yet scheduled) is never more urgent than a request
        # already scheduled: no request is preempted after being scheduled in the same step.
        self.running.sort(key=_urgency)
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.spec_token_ids and self._tokens_needed(request) > budget:
                request.spec_token_ids = []  # drafts only ever run whole, never split across steps
            num_new = min(self._tokens_needed(request), budget)
            if num_new <= 0:
                index += 1
                continue
            while True:
                if self.kv.allocate_slots(request, num_new) is not None:
                    break
                victim = self._pick_victim(index)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted itself; `running` shrank, same index now holds the next one
            spec = request.spec_token_ids if num_new == self._tokens_needed(request) else []
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, num_new,
                                              self.kv.get_block_ids(request.request_id), list(spec)))
            budget -= num_new
            index += 1

        # Admit waiting requests, unless this step already had to preempt (memory is tight).
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_hits = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hits
            if not self.config.enable_chunked_prefill and budget < num_new <= self.config.max_num_batched_tokens:
                break  # wait for a step with room for the whole prompt; one longer than any step is chunked anyway
            num_new = min(num_new, budget)
            if self.admission is not None and not self.admission.try_admit(request):
                break  # its adapter has no slot until a running request finishes
            if self.kv.allocate_slots(request, num_new, computed_blocks) is None:
                if self.admission is not None:
                    self.admission.release(request)
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hits
            request.metrics.num_cached_tokens = max(request.metrics.num_cached_tokens, num_hits)
            request.status = RequestStatus.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_hits, num_new, self.kv.get_block_ids(request.request_id)))
            budget -= num_new

        return SchedulerOutput(scheduled, self.config.max_num_batched_tokens - budget, preempted)

    def update_from_output(
        self, output: SchedulerOutput, sampled: Mapping[str, list[int]]
    ) -> dict[str, list[int]]:
        """Advance the computed-token counts after a step; return each still-running request's new tokens.

        `sampled` (the runner's output: accepted drafts + one token per request that sampled) is
        only read. The tokens are not appended here: the engine's output processor decides how many
        are kept (a stop inside a run of accepted drafts drops the rest) and appends those, and
        the engine then frees the requests it finished (`finish_request`). Until it has, a request
        that accepted drafts counts their KV as computed ahead of its `all_token_ids`.
        A request that is no longer running (aborted while the step ran) is skipped and its tokens
        are dropped. The returned lists are the runner's: read them only.
        """
        new_tokens: dict[str, list[int]] = {}
        for item in output.scheduled:
            request = item.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            drafts = len(item.spec_token_ids)
            request.num_computed_tokens += item.num_tokens - drafts
            request.spec_token_ids = []
            tokens = sampled.get(request.request_id)
            if not tokens:
                continue
            if drafts or item.lookahead:
                # Accepted drafts' KV is valid (the rejected ones' slots will be overwritten); a
                # multi-step trip computed the KV of every token it fed back in.
                request.num_computed_tokens += len(tokens) - 1
            new_tokens[request.request_id] = tokens
        return new_tokens

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_usage=self.kv.usage,
            num_preemptions_total=self.num_preemptions,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
        )
