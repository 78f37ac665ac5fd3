"""Speculative decoding as the engine sees it: one object, called once before and once after each step.

* `propose(running)`, before scheduling: each decoding sequence gets up to k draft tokens in
  `request.spec_token_ids`, unless the batch is above the static switch-off or the adaptive
  controller (kiln.spec_decode.controller) has measured that speculation does not pay at this
  batch size. The scheduler then runs the drafts with the sequence's next token, and the model
  runner verifies them (kiln.sample.rejection_sampler).
* `observe(sched, sampled, kept, seconds)`, after the step: counts what was verified and accepted
  and tells the controller what a decode-only step yielded.
* `free(seq_id)`, when a sequence leaves the engine: the proposer drops what it holds for it.

With `adaptive` (the default) each sequence also verifies only as many drafts as its recent
acceptance suggests (kiln.spec_decode.draft_length), at most k.

Invariant: this object decides only whether, and which, drafts are verified; what is generated
never depends on it (verification is lossless), only how fast.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kiln.config import SpeculativeConfig
from kiln.spec_decode.controller import SpeculationController
from kiln.spec_decode.draft_length import DraftLengthPolicy
from kiln.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from kiln.core.scheduler import SchedulerOutput
    from kiln.loader.model_loader import LoadedModel
    from kiln.request import Request


@dataclass(slots=True)
class SpecDecodeStats:
    """Running totals since the engine started (all zero when speculation is off)."""

    proposed_total: int = 0  # draft tokens verified
    accepted_total: int = 0  # of those, accepted
    steps_total: int = 0  # sequence-steps that verified drafts
    skipped_steps_total: int = 0  # engine steps not speculated: above the switch-off, or not paying
    draft_seconds_total: float = 0.0  # time spent in the proposer

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_total / self.proposed_total if self.proposed_total else None


class SpecDecoder:
    """Owns the proposer, the adaptive controller and the counters of one engine."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int) -> None:
        self.config = config
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.controller = SpeculationController(adaptive=config.adaptive)
        self.draft_length = DraftLengthPolicy(config.num_speculative_tokens) if config.adaptive else None
        self.stats = SpecDecodeStats()

    def snapshot(self) -> SpecDecodeStats:
        """A copy of the counters (the live object keeps counting)."""
        return replace(self.stats)

    # ---- before the step -------------------------------------------------------------------
    def propose(self, running: Sequence[Request]) -> None:
        """Set `spec_token_ids` of the decoding sequences in `running` that may speculate this step."""
        cfg = self.config
        if not running:
            return
        if len(running) > cfg.max_batch_size:
            self.stats.skipped_steps_total += 1
            return
        # A seeded sampled request consumes its random stream differently with and without drafts,
        # so it keeps speculating whatever the (timing-based) controller says: its output then
        # depends only on the batch, as without the controller, never on how fast steps ran.
        paying = self.controller.should_speculate(len(running))
        if not paying:
            self.stats.skipped_steps_total += 1
        wanted: dict[str, tuple[list[int], int]] = {}
        by_id: dict[str, Request] = {}
        for request in running:
            if request.num_computed_tokens != request.num_tokens - 1:
                continue  # still prefilling
            params = request.sampling_params
            if not paying and (params.seed is None or params.greedy):
                continue
            room = self._room(request)
            if room > 0:
                wanted[request.request_id] = (request.all_token_ids, room)
                by_id[request.request_id] = request
        if not wanted:
            return
        start = time.perf_counter()
        drafts = self.proposer.propose(wanted)
        self.stats.draft_seconds_total += time.perf_counter() - start
        for rid, tokens in drafts.items():
            by_id[rid].spec_token_ids = tokens

    def _room(self, request: Request) -> int:
        """Drafts this request may verify: its k, and never past max_tokens or the context."""
        params = request.sampling_params
        k = self.config.num_speculative_tokens
        if params.num_speculative_tokens is not None:
            k = min(params.num_speculative_tokens, k)
        # the step's own sampled token takes one place, hence the - 1s
        room = params.max_tokens - request.num_output_tokens - 1 if params.max_tokens is not None else k
        if self.draft_length is not None:
            k = min(k, self.draft_length.limit(request.request_id))
        return min(room, k, self.max_model_len - request.num_tokens - 1)

    # ---- after the step --------------------------------------------------------------------
    def observe(self, sched: SchedulerOutput, sampled: Mapping[str, Sequence[int]],
                kept: Mapping[str, Sequence[int]], seconds: float) -> None:
        """Count this step's verification and feed the controller.

        `sampled`: the runner's tokens per sequence (accepted drafts + one); `kept`: the tokens the
        output path kept of them (a stop inside a run of accepted drafts drops the rest).
        Acceptance counts what verification accepted; the controller sees the tokens kept.
        """
        for item in sched.scheduled:
            tokens = sampled.get(item.request.request_id)
            if item.spec_token_ids and tokens is not None:
                self.stats.steps_total += 1
                self.stats.proposed_total += len(item.spec_token_ids)
                self.stats.accepted_total += len(tokens) - 1
                if self.draft_length is not None:
                    self.draft_length.update(item.request.request_id, len(item.spec_token_ids), len(tokens) - 1)
        # Prefill steps say nothing about decoding speed: their time is the prompt's.
        if any(item.num_tokens != 1 + len(item.spec_token_ids) for item in sched.scheduled):
            return
        produced = sum(len(kept.get(item.request.request_id, ())) for item in sched.scheduled)
        had_drafts = any(item.spec_token_ids for item in sched.scheduled)
        self.controller.observe(len(sched.scheduled), had_drafts, produced, seconds)

    def free(self, seq_id: str) -> None:
        """The sequence left the engine (finished or aborted)."""
        self.proposer.free(seq_id)
        if self.draft_length is not None:
            self.draft_length.free(seq_id)


def build_spec_decoder(config: SpeculativeConfig | None, target: LoadedModel, num_blocks: int, block_size: int,
                       max_model_len: int) -> SpecDecoder | None:
    """The engine's SpecDecoder for `config` (None when speculation is off).

    A draft model gets as many KV blocks as the target (the same memory again for a same-shape draft).
    """
    if config is None:
        return None
    proposer: Proposer
    if config.method == "ngram":
        from kiln.spec_decode.ngram_proposer import NgramProposer

        proposer = NgramProposer(config.ngram_min, config.ngram_max)
    else:
        from kiln.spec_decode.draft_model import DraftModelProposer, build_draft_model

        assert config.draft_model is not None  # SpeculativeConfig checks this for 'draft'
        proposer = DraftModelProposer(build_draft_model(config.draft_model, target), num_blocks, block_size)
    return SpecDecoder(config, proposer, max_model_len)
