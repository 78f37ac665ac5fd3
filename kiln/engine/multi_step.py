"""When a step may run several decode steps at once (kiln.worker.multi_step), and how many.

`--num-scheduler-steps K` (vLLM's name for the same idea; default 4, 1 turns it off).
A scheduled step becomes a trip of up to K decode steps when nothing could change between those
steps except each sequence's next token:
- every scheduled sequence decodes exactly one token after its first output token (so the time to
  first token never waits for a trip), with no speculative drafts, and nothing is
  waiting to be admitted or was preempted (a new request would otherwise wait up to K steps);
- each request's sampling needs nothing the trip does not do: no logprobs, prompt logprobs,
  penalties, logit_bias, structured output or pending min_tokens; and it runs the base model (the
  fused step has no LoRA deltas, kiln.lora);
- the model runs pure decode steps through its fused native step on a single-process runner (no
  tensor parallel, no speculative decoder; plain and hybrid sliding-window caches both);
- every request has room for K more tokens (max_tokens, the context length) and the KV pool has
  blocks for them: the lookahead slots are allocated here, all or nothing for the trip's length.
K shrinks to what the tightest request allows; below 2 the step runs as a single step.

What it costs: tokens reach the output processor, and streams, once per trip (one token per chunk
still, K arriving together); under the async engine a trip ends after the step in which a request
arrives or is aborted (LLMEngine.trip_interrupt), so those wait one step at most.
"""

from __future__ import annotations

from kiln.core.scheduler import Scheduler, SchedulerOutput
from kiln.core.kv_cache_manager import KVCacheManager
from kiln.request import Request, RequestStatus


def _request_allows(request: Request) -> bool:
    p = request.sampling_params
    return (p.logprobs is None and p.prompt_logprobs is None and not p.has_penalties and not p.logit_bias
            and p.structured_outputs is None and request.num_output_tokens >= p.min_tokens and not request.lora_id)


def _room(request: Request, max_model_len: int) -> int:
    """Tokens the request may still generate (the trip must not run past its max_tokens or context)."""
    room = max_model_len - request.num_tokens
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None:
        room = min(room, max_tokens - request.num_output_tokens)
    return room


def plan_trip(sched: SchedulerOutput, scheduler: Scheduler, max_steps: int, max_model_len: int,
              runner_allows: bool) -> int:
    """The number of decode steps this scheduled step runs (1: a normal step). For more than 1 the
    lookahead KV slots are allocated and each item's `block_ids` refreshed to cover them."""
    if max_steps < 2 or not runner_allows or scheduler.waiting or sched.preempted_ids:
        return 1
    steps = max_steps
    for item in sched.scheduled:
        request = item.request
        # a decode proper: a prompt's last token (a full prefix-cache hit) gets its first token from one step
        decoding = item.num_tokens == 1 and item.start >= request.num_prompt_tokens
        if not decoding or item.spec_token_ids or not item.samples or not _request_allows(request):
            return 1
        steps = min(steps, _room(request, max_model_len))
    if steps < 2:
        return 1
    for item in sched.scheduled:
        # the step's own token is allocated already; this extends the table by steps - 1 tokens
        if scheduler.kv.allocate_slots(item.request, 1, num_lookahead_tokens=steps - 1) is None:
            return 1  # blocks taken so far stay with their requests, which fill them later
    for item in sched.scheduled:
        item.block_ids = scheduler.kv.get_block_ids(item.request.request_id)
        item.lookahead = steps - 1
    return steps


def cache_trip_blocks(sched: SchedulerOutput, kv: KVCacheManager) -> None:
    """After a trip's tokens are appended: enter the blocks the trip filled into the prefix cache.

    Single steps hash each block as the next step's allocation passes it; a trip fills up to K
    tokens' worth between allocations, and its last blocks would otherwise stay out of the cache
    (a follow-up turn of the conversation would miss them). An allocation of zero new tokens only
    hashes: the trip's lookahead already holds every block these tokens need."""
    for item in sched.scheduled:
        if item.lookahead and item.request.status == RequestStatus.RUNNING:
            kv.allocate_slots(item.request, 0)
