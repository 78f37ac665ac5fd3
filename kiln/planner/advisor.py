"""`kiln advise`: profile the workload, answer the four questions, rank recommendations, then verify them.

Verification re-runs the same profile with each of the top recommendations applied (one at a time, from
the same baseline), measures its throughput gain and its quality cost (kiln.planner.fidelity against the
baseline), and drops any that measured worse. The baseline is profiled before and after the candidates
and a gain counts against the better of its two runs, so machine drift cannot manufacture one.

The JSON report (schema "kiln.advise/1", documented in README "kiln plan and kiln advise"):
  profile           the baseline's measured Profile (kiln.planner.profile)
  questions         [{question, answer, evidence}]
  recommendations   verified better: [{name, settings, reason, predicted_gain, measured_gain, quality_kl,
                    quality_top1, slo_pass, cost_per_mtok, verified, ...}]
  dropped           measured worse (same fields); unverified: ranked below the ones verified
  baseline          {config, output_tok_s_runs, slo_pass, cost_per_mtok}; winner: the best verified or null
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.planner.profile import Profile, run_profile
from kiln.planner.rules import (
    candidates,
    ngram_tokens_per_step,
    questions,
)

SCHEMA = "kiln.advise/1"


@dataclass(frozen=True)
class Targets:
    """Service-level objectives and price (None: not given)."""

    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    tokens_per_second_per_user: float | None = None
    cost_per_hour: float | None = None
    max_quality_loss_kl: float | None = None

    def slo_pass(self, p: Profile) -> bool | None:
        checks = []
        if self.slo_ttft_ms is not None:
            checks.append(p.ttft_p95_s * 1e3 <= self.slo_ttft_ms)
        if self.slo_tpot_ms is not None:
            checks.append(p.tpot_p95_s * 1e3 <= self.slo_tpot_ms)
        if self.tokens_per_second_per_user is not None:
            checks.append(p.tpot_p95_s > 0 and 1 / p.tpot_p95_s >= self.tokens_per_second_per_user)
        return all(checks) if checks else None

    def cost_per_mtok(self, p: Profile) -> float | None:
        if self.cost_per_hour is None or p.output_tok_s <= 0:
            return None
        return self.cost_per_hour / (p.output_tok_s * 3600) * 1e6


class CalibratedSpeed:
    """rules.SpeedModel from `kiln plan`'s predictions: the baseline and the changed options as plans."""

    def __init__(self, model: str, baseline: dict[str, Any], cal: dict[str, Any], prompt_tokens: int) -> None:
        from kiln.planner.sources import resolve_source

        self.source = resolve_source(model)
        self.baseline, self.cal, self.prompt_tokens = baseline, cal, prompt_tokens

    def _plan(self, opts: dict[str, Any], concurrency: int):
        from kiln.planner.memory import PlanRequest, plan_memory

        dtype = opts.get("dtype", "auto")
        act = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]
        dense = "bf16" if act in ("bfloat16", "float16") else "fp32"
        weights = dense if opts.get("quantized_weights") == "dequantize" else "file"
        req = PlanRequest(weights=weights, activation_dtype=act, kv_cache_dtype=opts.get("kv_cache_dtype", "auto"),
                          concurrency=concurrency, context=1024, max_num_batched_tokens=opts.get("max_num_batched_tokens", 512))
        return plan_memory(self.source, req)

    def speedups(self, change: dict[str, Any], concurrency: int) -> tuple[float, float] | None:
        from kiln.planner.predict import decode_step_s, prefill_s

        base = self._plan(self.baseline, concurrency)
        if "_verify_rows" in change:  # the cost of verifying k+1 rows per sequence
            one = sum(decode_step_s(base, self.cal, concurrency).values())
            many = sum(decode_step_s(base, self.cal, concurrency, rows=change["_verify_rows"] * concurrency).values())
            return 1.0, one / many
        if "max_num_batched_tokens" in change:
            from kiln.planner.predict import kernel_path

            fixed = self.cal["paths"][kernel_path(base, True)]["fixed_s"]
            per_step = fixed[0] + fixed[1] * concurrency  # a step's cost outside its forward
            total = self.prompt_tokens
            steps_saved = math.ceil(total / self.baseline.get("max_num_batched_tokens", 512)) - math.ceil(
                total / change["max_num_batched_tokens"])
            t = prefill_s(base, self.cal, min(total, 1024)) * total / min(total, 1024)
            return t / max(t - steps_saved * per_step, 1e-6), 1.0
        if not set(change) <= {"dtype", "quantized_weights"}:
            return None
        new = self._plan({**self.baseline, **change}, concurrency)
        s_decode = sum(decode_step_s(base, self.cal, concurrency).values()) / sum(
            decode_step_s(new, self.cal, concurrency).values())
        s_prefill = prefill_s(base, self.cal, 512) / prefill_s(new, self.cal, 512)
        return s_prefill, s_decode


def _engine(model: str, opts: dict[str, Any], threads: int):
    from kiln.engine.arg_utils import EngineArgs
    from kiln.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(EngineArgs.from_kwargs(model=model, threads=threads, **opts))


def _measure(model: str, opts: dict[str, Any], threads: int, items: list, concurrency: int,
             fixed_ids: list[int] | Callable[[Any], list[int]] | None) -> tuple[Profile, Any, list, Any]:
    """(profile, teacher-forced logprobs, (prompt, output) pairs, kernel facts) of one configuration."""
    from kiln.planner.fidelity import teacher_forced_logprobs
    from kiln.planner.workload import WorkItem

    engine = _engine(model, opts, threads)
    try:
        run_profile(engine, [WorkItem(items[0].messages, 4)], 1, opts)  # warm-up: kernels, caches, the decode plan
        prof = run_profile(engine, items, concurrency, opts)
        logprobs = None
        if fixed_ids is not None:  # token ids, or a function of the tokenizer that makes them
            ids = fixed_ids(engine.tokenizer) if callable(fixed_ids) else fixed_ids
            logprobs = teacher_forced_logprobs(engine.loaded.model, opts.get("kv_cache_dtype", "auto"), ids)
        return prof, logprobs, prof.kernels.pop("_pairs", []), engine.tokenizer
    finally:
        del engine
        gc.collect()


def advise(model: str, workload: str, concurrency: int, baseline: dict[str, Any], targets: Targets = Targets(),
           threads: int = 2, num_requests: int | None = None, max_tokens: int = 48, top_n: int = 3,
           log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The whole `kiln advise` run; returns the report (SCHEMA)."""
    from kiln.planner.calibration import load_calibration, machine_key
    from kiln.planner.fidelity import compare, fixed_text_ids
    from kiln.planner.memory import NATIVE_BLOCK_TYPES
    from kiln.planner.sources import resolve_source
    from kiln.planner.workload import load_workload

    n = num_requests or (3 if concurrency == 1 else concurrency + concurrency // 2)
    items = load_workload(workload, n, max_tokens)
    native_blocks = any(t.type_name.lower() in NATIVE_BLOCK_TYPES for t in resolve_source(model).tensors)
    log(f"baseline profile ({n} requests at concurrency {concurrency}) ...")
    base, base_lp, pairs, tokenizer = _measure(model, baseline, threads, items, concurrency, fixed_text_ids)
    fixed = fixed_text_ids(tokenizer)
    base.kernels["native_blocks_available"] = native_blocks
    cal = load_calibration(threads)
    speed = CalibratedSpeed(model, baseline, cal, base.prompt_tokens) if cal else None
    recs = candidates(base, baseline, speed, ngram_tokens_per_step(pairs) if pairs else None, _kv_quality())
    qs = questions(base, baseline)
    for rec in recs[:top_n]:
        log(f"verifying: {rec.name} ...")
        prof, lp, _, _ = _measure(model, {**baseline, **rec.settings}, threads, items, concurrency, fixed)
        rec.profile = prof.as_dict()
        rec.quality_kl, rec.quality_top1 = compare(base_lp, lp)
        rec.slo_pass, rec.cost_per_mtok = targets.slo_pass(prof), targets.cost_per_mtok(prof)
    log("baseline again (drift check) ...")
    again, _, _, _ = _measure(model, baseline, threads, items, concurrency, None)
    ref = max(base.output_tok_s, again.output_tok_s)
    kept, dropped = [], []
    for rec in recs[:top_n]:
        rec.measured_gain = rec.profile["output_tok_s"] / ref - 1
        too_lossy = targets.max_quality_loss_kl is not None and rec.quality_kl > targets.max_quality_loss_kl
        rec.verified = "better" if rec.measured_gain > 0 and not too_lossy else (
            "over the quality budget (dropped)" if too_lossy else "worse (dropped)")
        (kept if rec.verified == "better" else dropped).append(rec)
    kept.sort(key=lambda r: -(r.measured_gain or 0))
    winner = kept[0] if kept else None
    return {
        "schema": SCHEMA, "model": model, "workload": workload, "concurrency": concurrency,
        "machine": machine_key(threads), "calibrated": cal is not None,
        "profile": base.as_dict(), "questions": [vars(q) for q in qs],
        "recommendations": [r.as_dict() for r in kept], "dropped": [r.as_dict() for r in dropped],
        "unverified": [r.as_dict() for r in recs[top_n:]],
        "baseline": {"config": baseline, "output_tok_s_runs": [base.output_tok_s, again.output_tok_s],
                     "slo_pass": targets.slo_pass(base), "cost_per_mtok": targets.cost_per_mtok(base)},
        "winner": None if winner is None else {"name": winner.name, "config": {**baseline, **winner.settings}},
    }


def _kv_quality() -> str:
    from kiln.planner.quality import kv_cost

    q = kv_cost("int8")
    return q.describe() if q else ""
