"""SpecDecoder without a model: which sequences are asked for drafts, how many, and what is counted."""

from __future__ import annotations

from kiln.config import SpeculativeConfig
from kiln.core.scheduler import ScheduledRequest, SchedulerOutput
from kiln.request import Request
from kiln.sampling_params import SamplingParams
from kiln.spec_decode.proposer import ProposalRequests
from kiln.spec_decode.spec_decoder import SpecDecoder


class Recording:
    """A Proposer that drafts [7] * k and remembers what it was asked and told."""

    def __init__(self, skip: frozenset[str] = frozenset()) -> None:
        self.asked: list[dict[str, int]] = []
        self.freed: list[str] = []
        self.skip = skip

    def propose(self, requests: ProposalRequests) -> dict[str, list[int]]:
        self.asked.append({rid: k for rid, (_, k) in requests.items()})
        return {rid: [7] * k for rid, (_, k) in requests.items() if rid not in self.skip}

    def free(self, request_id: str) -> None:
        self.freed.append(request_id)


def decoding(rid: str, prompt_len: int = 4, **params) -> Request:
    req = Request(rid, list(range(prompt_len)), SamplingParams(**params), max_model_len=64)
    req.num_computed_tokens = req.num_tokens - 1
    return req


def spec(proposer: Recording, **cfg) -> SpecDecoder:
    config = SpeculativeConfig(**{"num_speculative_tokens": 4, "adaptive": False, "max_batch_size": 4, **cfg})
    return SpecDecoder(config, proposer, max_model_len=64)


def test_room_bounds_k_by_max_tokens_per_request_k_and_context() -> None:
    p = Recording()
    reqs = [decoding("free", temperature=0), decoding("short", temperature=0, max_tokens=3),
            decoding("k1", temperature=0, num_speculative_tokens=1), decoding("ctx", prompt_len=61, temperature=0)]
    spec(p).propose(reqs)
    assert p.asked == [{"free": 4, "short": 2, "k1": 1, "ctx": 2}]
    assert [r.spec_token_ids for r in reqs] == [[7] * 4, [7] * 2, [7], [7] * 2]


def test_prefilling_sequences_and_large_batches_are_not_asked() -> None:
    p = Recording()
    prefill = decoding("p", temperature=0)
    prefill.num_computed_tokens = 0
    s = spec(p, max_batch_size=1)
    s.propose([prefill])
    assert p.asked == []  # nothing to ask: the proposer is not called at all
    s.propose([decoding("a", temperature=0), decoding("b", temperature=0)])  # 2 > max_batch_size
    assert s.stats.skipped_steps_total == 1 and p.asked == []


def test_a_request_left_out_of_the_answer_keeps_its_drafts() -> None:
    """What the draft model does when it has no free blocks for a request."""
    p = Recording(skip=frozenset({"b"}))
    a, b = decoding("a", temperature=0), decoding("b", temperature=0)
    b.spec_token_ids = [1, 2]
    spec(p).propose([a, b])
    assert a.spec_token_ids == [7] * 4 and b.spec_token_ids == [1, 2]


def test_not_paying_spares_only_seeded_sampling() -> None:
    p = Recording()
    s = spec(p, adaptive=True)
    s.controller.should_speculate = lambda num_running: False  # type: ignore[method-assign]
    greedy, unseeded, seeded = (decoding("g", temperature=0), decoding("u", temperature=0.8),
                                decoding("s", temperature=0.8, seed=1))
    s.propose([greedy, unseeded, seeded])
    # (adaptive: a new sequence's draft budget is half of k, kiln.spec_decode.draft_length)
    assert p.asked == [{"s": 2}] and s.stats.skipped_steps_total == 1


def test_observe_counts_verified_and_accepted_drafts_and_free_reaches_the_proposer() -> None:
    p = Recording()
    s = spec(p)
    a, b = decoding("a", temperature=0), decoding("b", temperature=0)
    sched = SchedulerOutput([ScheduledRequest(a, 3, 4, [0], [7, 7, 7]), ScheduledRequest(b, 3, 1, [1])], 5, [])
    sampled = {"a": [7, 7, 5], "b": [9]}
    s.observe(sched, sampled, {"a": [7], "b": [9]}, 0.01)  # a stopped after its first token
    assert (s.stats.steps_total, s.stats.proposed_total, s.stats.accepted_total) == (1, 3, 2)
    assert s.stats.acceptance_rate == 2 / 3
    s.free("a")
    assert p.freed == ["a"]


def test_draft_budget_grows_on_full_acceptance_and_falls_to_what_a_rejection_accepted() -> None:
    from kiln.spec_decode.draft_length import DraftLengthPolicy

    policy = DraftLengthPolicy(8)
    assert policy.limit("a") == 4  # a new sequence starts at half of k
    policy.update("a", 4, 4)
    assert policy.limit("a") == 8  # doubled, capped at k
    policy.update("a", 8, 8)
    assert policy.limit("a") == 8
    policy.update("a", 8, 2)
    assert policy.limit("a") == 2  # rejected at the third draft: two would have been accepted
    policy.update("a", 2, 0)
    assert policy.limit("a") == 1  # never below one
    policy.update("a", 1, 1)
    assert policy.limit("a") == 2
    policy.update("a", 1, 1)  # the proposer offered fewer than the budget, all accepted: no shrink
    assert policy.limit("a") == 2
    policy.free("a")
    assert policy.limit("a") == 4


def test_adaptive_spec_decoder_asks_each_sequence_for_its_budget() -> None:
    p = Recording()
    s = spec(p, num_speculative_tokens=8, adaptive=True)
    a, b = decoding("a", temperature=0), decoding("b", temperature=0)
    s.propose([a, b])
    assert p.asked[-1] == {"a": 4, "b": 4}
    sched = SchedulerOutput([ScheduledRequest(a, 3, 5, [0], [7] * 4), ScheduledRequest(b, 3, 5, [1], [7] * 4)], 10, [])
    s.observe(sched, {"a": [7] * 5, "b": [7, 9]}, {"a": [7] * 5, "b": [7, 9]}, 0.01)  # a: all 4 accepted; b: 1
    a.spec_token_ids, b.spec_token_ids = [], []
    s.propose([a, b])
    assert p.asked[-1] == {"a": 8, "b": 1}
    s.free("b")
    assert s.draft_length is not None and s.draft_length.limit("b") == 4
