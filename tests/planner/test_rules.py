"""The decision rules on synthetic profiles: each bottleneck leads to its remedy, and only to it."""

from __future__ import annotations

import pytest

from kiln.planner.advisor import Targets
from kiln.planner.profile import Profile
from kiln.planner.rules import amdahl, candidates, ngram_tokens_per_step, questions

FAST_KERNELS = {"linear_methods": {"gguf Q4_1": 120}, "dtype": "float32", "decode_step": "fused native decode step",
                "kv_cache": "auto = float16", "amx": False, "native_blocks_available": True}


def profile(**kw) -> Profile:
    base = dict(config={}, concurrency=1, num_requests=4, elapsed_s=10.0, output_tokens=256, prompt_tokens=400,
                output_tok_s=25.6, prefill_time_share=0.1, decode_step_ms_median=10.0, step_ms_cv=0.2,
                batch_occupancy=1.0, kv_usage_peak=0.05, kv_usage_mean=0.03, preemptions=0,
                prefix_cache_hit_rate=0.0, spec_acceptance=None, ttft_p50_s=0.1, ttft_p95_s=0.2, tpot_p50_s=0.04,
                tpot_p95_s=0.05, peak_rss_mib=1000.0, kernels=dict(FAST_KERNELS))
    base.update(kw)
    return Profile(**base)


def names(recs) -> list[str]:
    return [r.name for r in recs]


def test_decode_bound_dense_weights_recommend_weight_quantization() -> None:
    p = profile(kernels={**FAST_KERNELS, "linear_methods": {"dense": 120}})
    recs = candidates(p, {"quantized_weights": "dequantize"}, speed=None)
    assert recs[0].name.startswith("weight quantization") and recs[0].settings == {"quantized_weights": "auto"}
    assert recs[0].predicted_gain > 0.5  # decode 90 % of the time, decode 2x faster (fallback model)
    qs = {q.question: q.answer for q in questions(p, {"quantized_weights": "dequantize"})}
    assert qs["prefill-bound or decode-bound?"] == "decode-bound"
    assert qs["are the best kernels for this device in use?"].startswith("no: GGUF blocks expanded")


def test_kv_limited_profile_recommends_int8_kv_cache() -> None:
    p = profile(concurrency=32, num_requests=48, kv_usage_peak=1.0, preemptions=12, prefill_time_share=0.4)
    recs = candidates(p, {}, speed=None)
    assert "int8 KV cache" in names(recs)
    assert next(r for r in recs if r.name == "int8 KV cache").settings == {"kv_cache_dtype": "int8"}
    qs = {q.question: q.answer for q in questions(p, {})}
    assert qs["is the KV cache the capacity limit?"] == "yes"
    assert qs["is batching stable under this traffic?"] == "no"
    # already int8: nothing more to say about the KV cache
    assert "int8 KV cache" not in names(candidates(p, {"kv_cache_dtype": "int8"}, speed=None))


def test_high_acceptance_code_workload_recommends_ngram_speculation() -> None:
    code = list(range(100, 160))
    pairs = [(code, code[:40])]  # the output copies the prompt: every draft is accepted
    tps = ngram_tokens_per_step(pairs)
    assert tps > 3
    recs = candidates(profile(), {}, speed=None, ngram_tps=tps)
    assert recs[0].name.startswith("n-gram speculation") and recs[0].settings["speculative_model"] == "ngram"
    # not at 32 concurrent sequences (kiln switches speculation off above 2), nor when outputs never repeat
    assert not any(n.startswith("n-gram") for n in names(candidates(profile(concurrency=32), {}, None, ngram_tps=tps)))
    assert ngram_tokens_per_step([(list(range(50)), list(range(1000, 1040)))]) == 1.0


def test_prefill_bound_batch_recommends_a_larger_token_budget_and_no_weight_change() -> None:
    p = profile(concurrency=32, num_requests=48, prefill_time_share=0.6)
    recs = candidates(p, {}, speed=None)
    assert recs[0].settings == {"max_num_batched_tokens": 2048}
    assert not any(n.startswith("weight quantization") for n in names(recs))  # the kernels are already the best
    assert questions(p, {})[0].answer == "prefill-bound"


def test_bf16_without_amx_recommends_fp32_and_a_model_overrides_the_fallback() -> None:
    p = profile(prefill_time_share=0.8, kernels={**FAST_KERNELS, "dtype": "bfloat16"})

    class Speed:
        def speedups(self, change, concurrency):
            return (2.0, 1.0) if change == {"dtype": "float32"} else None

    rec = next(r for r in candidates(p, {"dtype": "bfloat16"}, Speed()) if r.settings == {"dtype": "float32"})
    assert rec.predicted_gain == pytest.approx(amdahl(0.8, 2.0, 1.0)) == pytest.approx(1 / 0.6 - 1)


def test_targets_slo_and_cost() -> None:
    p = profile(ttft_p95_s=0.8, tpot_p95_s=0.05, output_tok_s=100.0)
    assert Targets(slo_ttft_ms=1000, slo_tpot_ms=60).slo_pass(p) is True
    assert Targets(slo_ttft_ms=500).slo_pass(p) is False
    assert Targets(tokens_per_second_per_user=25).slo_pass(p) is False  # 20 tok/s at the p95 inter-token time
    assert Targets().slo_pass(p) is None
    assert Targets(cost_per_hour=3.6).cost_per_mtok(p) == pytest.approx(10.0)  # 360k tokens an hour for $3.60


def test_amdahl_limits() -> None:
    assert amdahl(0.0, 5.0, 2.0) == pytest.approx(1.0)
    assert amdahl(1.0, 5.0, 2.0) == pytest.approx(4.0)
    assert amdahl(0.5, 1.0, 1.0) == pytest.approx(0.0)
