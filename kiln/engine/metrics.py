"""Prometheus metrics for the server, on a private registry (several engines in one process never collide).

Two kinds of updates, both from the engine thread (prometheus-client is thread-safe, the HTTP
layer only renders):
* per step: `observe_engine(engine.stats())` sets the gauges and advances the counters that the
  engine keeps as running totals (tokens, preemptions, prefix-cache queries/hits);
* per request: first token (TTFT), each later step that produced tokens (inter-token latency),
  and the end (finish reason, end-to-end latency, time per output token).

Names follow vLLM's (`kiln:` instead of `vllm:`) so existing dashboards need only a rename.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from kiln.engine.llm_engine import EngineStats

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class EngineMetrics:
    """Every metric the server exports. `render()` gives the Prometheus text format."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests_finished = Counter(
            "kiln:request_success", "Finished sequences by finish reason (stop, length, abort, error).",
            ["finish_reason"], registry=r,
        )
        for reason in ("stop", "length", "abort", "error"):
            self.requests_finished.labels(finish_reason=reason)  # export zeros before the first request
        self.ttft = Histogram("kiln:time_to_first_token_seconds", "Time to first token.", buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "kiln:time_per_output_token_seconds", "Mean time per output token after the first, per request.",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "kiln:inter_token_latency_seconds", "Time between two consecutive outputs of one request.",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "kiln:e2e_request_latency_seconds", "Arrival to last token.", buckets=_E2E_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("kiln:prompt_tokens", "Prompt tokens admitted (times n).", registry=r)
        self.generation_tokens = Counter("kiln:generation_tokens", "Tokens generated.", registry=r)
        self.running = Gauge("kiln:num_requests_running", "Sequences running (being prefilled or decoded).", registry=r)
        self.waiting = Gauge("kiln:num_requests_waiting", "Sequences waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge("kiln:kv_cache_usage_perc", "KV cache blocks in use, percent (0-100).", registry=r)
        self.kv_blocks_used = Gauge("kiln:kv_cache_blocks_in_use", "KV cache blocks held by requests.", registry=r)
        self.kv_blocks_total = Gauge("kiln:kv_cache_blocks_total", "KV cache blocks in the pool.", registry=r)
        self.prefix_queries = Counter("kiln:prefix_cache_queries", "Prompt blocks looked up in the prefix cache.", registry=r)
        self.prefix_hits = Counter("kiln:prefix_cache_hits", "Prompt blocks found in the prefix cache.", registry=r)
        self.preemptions = Counter("kiln:num_preemptions", "Sequences preempted (KV freed, recomputed later).", registry=r)
        self.steps = Counter("kiln:engine_steps", "Engine steps (one forward pass each).", registry=r)
        self.step_errors = Counter("kiln:engine_step_errors", "Engine steps that raised; their requests finished with an error.", registry=r)
        self.spec_proposed = Counter("kiln:spec_decode_num_draft_tokens", "Speculative draft tokens verified.", registry=r)
        self.spec_accepted = Counter("kiln:spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.", registry=r)
        self.spec_steps = Counter("kiln:spec_decode_num_steps",
                                  "Sequence-steps that speculated (skipped when the batch is large).", registry=r)
        self.spec_skipped = Counter("kiln:spec_decode_num_skipped_steps",
                                    "Engine steps not speculated: more sequences ran than --speculative-disable-by-batch-size, "
                                    "or speculation was measured not to pay at this batch size.", registry=r)
        # Running totals already counted, so counters advance by the difference.
        self._seen: dict[str, int] = {}

    # ---- per step ---------------------------------------------------------------------
    def observe_engine(self, stats: EngineStats) -> None:
        s = stats.scheduler
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        used = round(s.kv_usage * stats.num_blocks)
        self.kv_blocks_used.set(used)
        self.kv_blocks_total.set(stats.num_blocks)
        self.kv_usage.set(100.0 * used / stats.num_blocks if stats.num_blocks else 0.0)
        self._advance(self.prompt_tokens, "prompt", stats.prompt_tokens_total)
        self._advance(self.generation_tokens, "generation", stats.generation_tokens_total)
        self._advance(self.prefix_queries, "queries", s.prefix_cache_queries)
        self._advance(self.prefix_hits, "hits", s.prefix_cache_hits)
        self._advance(self.preemptions, "preemptions", s.num_preemptions_total)
        self._advance(self.steps, "steps", stats.step_count)
        self._advance(self.spec_proposed, "spec_proposed", stats.spec.proposed_total)
        self._advance(self.spec_accepted, "spec_accepted", stats.spec.accepted_total)
        self._advance(self.spec_steps, "spec_steps", stats.spec.steps_total)
        self._advance(self.spec_skipped, "spec_skipped", stats.spec.skipped_steps_total)

    def _advance(self, counter: Counter, key: str, total: int) -> None:
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._seen[key] = max(total, self._seen.get(key, 0))

    # ---- per request ------------------------------------------------------------------
    def observe_first_token(self, ttft: float) -> None:
        self.ttft.observe(max(ttft, 0.0))

    def observe_inter_token(self, gap: float) -> None:
        self.itl.observe(max(gap, 0.0))

    def observe_finished(self, finish_reasons: list[str | None], e2e: float, tpot: float | None) -> None:
        for reason in finish_reasons:
            self.requests_finished.labels(finish_reason=reason or "abort").inc()
        self.e2e.observe(max(e2e, 0.0))
        if tpot is not None:
            self.tpot.observe(max(tpot, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
