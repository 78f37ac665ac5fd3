"""Scheduler.update_from_output: bookkeeping only. It reads the runner's tokens without changing
them, returns the new tokens of requests still running, and finishes nothing itself."""

from __future__ import annotations

from kiln.config import SchedulerConfig
from kiln.core.kv_cache_manager import KVCacheManager
from kiln.core.scheduler import Scheduler
from kiln.request import Request, RequestStatus
from kiln.sampling_params import SamplingParams

EOS = 0


def _running(*prompts: list[int]) -> tuple[Scheduler, list[Request]]:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(16, 4, False), 64)
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=2), frozenset({EOS})) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add_request(r)
    return sched, reqs


def test_returns_new_tokens_without_touching_the_runner_output_or_finishing() -> None:
    sched, (a, b) = _running([1, 2, 3], [4, 5])
    out = sched.schedule()  # both prompts whole: both sample
    sampled = {"r0": [EOS], "r1": [7]}
    frozen = {k: list(v) for k, v in sampled.items()}
    new = sched.update_from_output(out, sampled)
    assert new == frozen and sampled == frozen
    # EOS is not the scheduler's business: the output processor decides, the engine finishes
    assert a.status == b.status == RequestStatus.RUNNING and a.num_computed_tokens == 3
    assert a.output_token_ids == [] and len(sched.running) == 2


def test_accepted_drafts_count_as_computed_and_drafts_are_cleared() -> None:
    sched, (a,) = _running([1, 2, 3])
    sched.update_from_output(sched.schedule(), {"r0": [9]})
    a.append_output_token(9)  # what the output processor does with a kept token
    a.spec_token_ids = [5, 6, 7]
    out = sched.schedule()
    assert out.scheduled[0].num_tokens == 4
    new = sched.update_from_output(out, {"r0": [5, 6, 8]})  # two drafts accepted, one corrected
    assert new == {"r0": [5, 6, 8]} and a.spec_token_ids == []
    assert a.num_computed_tokens == 4 + 2  # the step's token and both accepted drafts


def test_a_request_finished_during_the_step_is_skipped() -> None:
    sched, (a, b) = _running([1, 2], [3, 4])
    out = sched.schedule()
    sched.finish_request("r0", RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, {"r0": [7], "r1": [8]}) == {"r1": [8]}
    assert a.num_computed_tokens == 0 and b.num_computed_tokens == 2
