"""A short measured profile of a workload on one engine configuration (what `kiln advise` decides from).

Closed loop: `concurrency` requests in flight, a new one submitted as one finishes, until `num_requests`
have finished; greedy, every request runs to its max_tokens (ignore_eos) so configurations compare on the
same tokens. Per step it records the wall time and how many prompt tokens the step computed (the
scheduler's output, read through a wrapper of `schedule` on this engine only), so time splits into steps
with prefill work and pure decode steps. Invariant: nothing here changes what the engine computes.
"""

from __future__ import annotations

from collections import Counter

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from kiln.planner.workload import WorkItem


@dataclass
class Profile:
    """What one profile run measured. Times in seconds, rates per second, shares in [0, 1]."""

    config: dict[str, Any]
    concurrency: int
    num_requests: int
    elapsed_s: float
    output_tokens: int
    prompt_tokens: int
    output_tok_s: float
    prefill_time_share: float
    decode_step_ms_median: float
    step_ms_cv: float  # (p90 - p10) / median of pure decode step times: batching stability
    batch_occupancy: float  # mean running sequences in decode steps / concurrency
    kv_usage_peak: float
    kv_usage_mean: float
    preemptions: int
    prefix_cache_hit_rate: float
    spec_acceptance: float | None
    ttft_p50_s: float
    ttft_p95_s: float
    tpot_p50_s: float
    tpot_p95_s: float
    peak_rss_mib: float
    kernels: dict[str, Any] = field(default_factory=dict)
    op_profile: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def kernel_facts(engine: Any) -> dict[str, Any]:
    """Which kernels this engine runs: linear methods, activation dtype, decode path, KV storage."""
    from kiln.kernels.native import native_status

    model = engine.loaded.model
    methods: dict[str, int] = {}
    for m in model.modules():
        if hasattr(m, "method"):
            methods[m.method.name.split(":")[0]] = methods.get(m.method.name.split(":")[0], 0) + 1
    return {"linear_methods": methods, "dtype": str(model.dtype).removeprefix("torch."),
            "decode_step": model.decode_plan_status, "kv_cache": engine.kv_budget.storage,
            "native": native_status(), "amx": _amx()}


def _amx() -> bool:
    from kiln.loader.model_loader import cpu_has_amx_bf16

    return bool(cpu_has_amx_bf16())


def run_profile(engine: Any, items: list[WorkItem], concurrency: int, config: dict[str, Any]) -> Profile:
    """Drive `engine` (an LLMEngine, on this thread) through `items` at `concurrency`; measure."""
    from kiln.sampling_params import SamplingParams

    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(list(w.messages), add_generation_prompt=True),
                          add_special_tokens=False) for w in items]
    last: dict[str, Any] = {}
    schedule = engine.scheduler.schedule

    def recording_schedule():  # a measurement hook: the engine's own method, its output kept
        out = schedule()
        last["sched"] = out
        return out
    engine.scheduler.schedule = recording_schedule
    stats0 = engine.stats()
    submitted: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    steps: list[tuple[float, int, int]] = []  # (seconds, prefill tokens, running sequences)
    kv: list[float] = []
    pairs: list[tuple[list[int], list[int]]] = []  # (prompt, output) of each finished request
    nxt = 0
    start = time.perf_counter()
    try:
        while len(done) < len(items):
            while nxt < len(items) and len(submitted) - len(done) < concurrency:
                rid = engine.add_request({"prompt_token_ids": prompts[nxt]}, SamplingParams(
                    temperature=0, max_tokens=items[nxt].max_tokens, ignore_eos=True))
                submitted[rid] = time.perf_counter()
                nxt += 1
            last.pop("sched", None)
            t0 = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            sched = last.get("sched")
            if sched is not None and not sched.is_empty:
                pre = sum(max(0, min(s.start + s.num_tokens, s.request.num_prompt_tokens) - s.start)
                          for s in sched.scheduled)
                # a multi-step trip (kiln.engine.multi_step) ran `trip` decode steps in this engine step:
                # recorded as that many steps of its share of the time each
                trip = max([1, *(s.lookahead + 1 for s in sched.scheduled)]) if not pre else 1
                if trip > 1:
                    made = Counter(o.request_id for o in outs if o.outputs and o.outputs[0].delta_token_ids)
                    trip = max(made.values(), default=1)
                steps.extend([((now - t0) / trip, pre, len(sched.scheduled))] * trip)
            kv.append(engine.scheduler.stats().kv_usage)
            for o in outs:
                if o.outputs and o.outputs[0].token_ids and o.request_id not in first:
                    first[o.request_id] = now
                if o.finished:
                    done[o.request_id] = (now, len(o.outputs[0].token_ids))
                    pairs.append((list(o.prompt_token_ids), list(o.outputs[0].token_ids)))
    finally:
        engine.scheduler.schedule = schedule
    elapsed = time.perf_counter() - start
    s1 = engine.stats()
    facts = kernel_facts(engine)
    facts["_pairs"] = pairs  # taken out by the advisor (n-gram replay); never serialised
    return _summarise(config, concurrency, items, prompts, elapsed, steps, kv, submitted, first, done, stats0, s1, facts)


def _summarise(config, concurrency, items, prompts, elapsed, steps, kv, submitted, first, done, s0, s1, kernels) -> Profile:
    decode_steps = [t for t, pre, _ in steps if pre == 0]
    prefill_time = sum(t for t, pre, _ in steps if pre > 0)
    total_time = sum(t for t, _, _ in steps) or 1e-9
    running = [n for _, pre, n in steps if pre == 0]
    ttft = [first[r] - submitted[r] for r in done if r in first]
    tpot = [(done[r][0] - first[r]) / (done[r][1] - 1) for r in done if r in first and done[r][1] > 1]
    out_tokens = sum(n for _, n in done.values())
    q = s1.scheduler.prefix_cache_queries - s0.scheduler.prefix_cache_queries
    h = s1.scheduler.prefix_cache_hits - s0.scheduler.prefix_cache_hits
    spec = s1.spec
    med = statistics.median(decode_steps) if decode_steps else 0.0
    # spread, not stdev: one step stalled by another process on a shared CPU should not flip the answer
    cv = (_pct(decode_steps, 0.9) - _pct(decode_steps, 0.1)) / med if len(decode_steps) > 1 and med else 0.0
    return Profile(
        config=dict(config), concurrency=concurrency, num_requests=len(items), elapsed_s=elapsed,
        output_tokens=out_tokens, prompt_tokens=sum(map(len, prompts)), output_tok_s=out_tokens / elapsed,
        prefill_time_share=prefill_time / total_time, decode_step_ms_median=1e3 * med, step_ms_cv=cv,
        batch_occupancy=(statistics.mean(running) / concurrency) if running else 0.0,
        kv_usage_peak=max(kv, default=0.0), kv_usage_mean=statistics.mean(kv) if kv else 0.0,
        preemptions=s1.scheduler.num_preemptions_total - s0.scheduler.num_preemptions_total,
        prefix_cache_hit_rate=h / q if q else 0.0,
        spec_acceptance=spec.acceptance_rate if spec.steps_total else None,
        ttft_p50_s=_pct(ttft, 0.5), ttft_p95_s=_pct(ttft, 0.95), tpot_p50_s=_pct(tpot, 0.5), tpot_p95_s=_pct(tpot, 0.95),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, kernels=kernels)
