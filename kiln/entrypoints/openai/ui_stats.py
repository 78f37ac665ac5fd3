"""The dashboard's feed: the engine's own Prometheus metrics as one small JSON object per poll.

Rates and latency percentiles are over a sliding window (default 10 s), computed from the difference
between the snapshot taken now and the oldest one kept inside the window, so a dashboard shows what
is happening now rather than lifetime averages. Percentiles are estimated from histogram buckets the
way Prometheus' histogram_quantile does (linear within the bucket that holds the rank).

Invariants: reading the metrics never touches the engine (prometheus-client is thread-safe and the
engine thread is the only writer); the history holds at most `keep_s` seconds of snapshots.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kiln.engine.metrics import EngineMetrics

Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), ascending, last bound +inf


@dataclass(slots=True)
class Snapshot:
    t: float
    values: dict[str, float] = field(default_factory=dict)  # counter totals and gauges, by metric name
    hists: dict[str, Buckets] = field(default_factory=dict)


def take_snapshot(metrics: EngineMetrics, now: float | None = None) -> Snapshot:
    snap = Snapshot(time.monotonic() if now is None else now)
    for family in metrics.registry.collect():
        name = family.name.removeprefix("kiln:")
        if family.type == "histogram":
            snap.hists[name] = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
        elif family.type == "counter":
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = name + "".join(f".{v}" for v in s.labels.values())
                    snap.values[key] = snap.values.get(key, 0.0) + s.value
        else:
            for s in family.samples:
                snap.values[name] = s.value
    return snap


def quantile(buckets: Buckets, q: float) -> float | None:
    """The q-quantile of a histogram given as cumulative bucket counts; None with no observations.
    A rank in the +inf bucket reports the highest finite bound (the most that can be said)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            inside = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / inside if inside else 1.0)
        prev_bound, prev_count = bound, count
    return prev_bound


def _diff(new: Buckets, old: Buckets | None) -> Buckets:
    if not old:
        return new
    return [(b, c - oc) for (b, c), (_, oc) in zip(new, old)]


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


class StatsFeed:
    """Keeps recent snapshots of one EngineMetrics and answers `payload()` for the dashboard."""

    def __init__(self, metrics: EngineMetrics, window_s: float = 10.0, keep_s: float = 60.0) -> None:
        self.metrics = metrics
        self.window_s = window_s
        self.keep_s = keep_s
        self._history: deque[Snapshot] = deque()

    def payload(self, now: float | None = None) -> dict[str, Any]:
        """One poll: take a snapshot, compare it with the window's oldest, drop what is too old."""
        cur = take_snapshot(self.metrics, now)
        while self._history and cur.t - self._history[0].t > self.keep_s:
            self._history.popleft()
        base = next((s for s in self._history if cur.t - s.t <= self.window_s), None)
        self._history.append(cur)
        v, b = cur.values, base.values if base else {}
        span = cur.t - base.t if base else 0.0

        def delta(key: str) -> float:
            return v.get(key, 0.0) - b.get(key, 0.0)

        def rate(key: str) -> float | None:
            return delta(key) / span if span > 0 else None

        out: dict[str, Any] = {
            "window_s": round(span, 3),
            "running": v.get("num_requests_running", 0.0), "waiting": v.get("num_requests_waiting", 0.0),
            "kv_blocks_in_use": v.get("kv_cache_blocks_in_use", 0.0), "kv_blocks_total": v.get("kv_cache_blocks_total", 0.0),
            "kv_usage_pct": v.get("kv_cache_usage_perc", 0.0),
            "output_tok_s": rate("generation_tokens"), "prompt_tok_s": rate("prompt_tokens"),
            # hit rate and acceptance over the window, falling back to lifetime when the window saw none
            "prefix_hit_rate": _ratio(delta("prefix_cache_hits"), delta("prefix_cache_queries"))
            if delta("prefix_cache_queries") > 0 else _ratio(v.get("prefix_cache_hits", 0), v.get("prefix_cache_queries", 0)),
            "spec_acceptance": _ratio(delta("spec_decode_num_accepted_tokens"), delta("spec_decode_num_draft_tokens"))
            if delta("spec_decode_num_draft_tokens") > 0
            else _ratio(v.get("spec_decode_num_accepted_tokens", 0), v.get("spec_decode_num_draft_tokens", 0)),
            "finished": {r: v.get(f"request_success.{r}", 0.0) for r in ("stop", "length", "abort", "error")},
            "generation_tokens_total": v.get("generation_tokens", 0.0),
        }
        for hist, short in (("time_to_first_token_seconds", "ttft"), ("inter_token_latency_seconds", "itl")):
            window = _diff(cur.hists.get(hist, []), base.hists.get(hist) if base else None)
            for q in (0.5, 0.95, 0.99):
                out[f"{short}_p{round(q * 100)}_s"] = quantile(window, q)
        return out
