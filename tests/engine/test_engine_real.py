"""Engine behaviour on the real default model: batching, prefix caching, preemption, abort."""

from __future__ import annotations

import pytest

from kiln import LLM, SamplingParams
from kiln.bench.data import gsm8k_questions, long_text

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts_of_varied_length(llm: LLM) -> list[list[int]]:
    text = long_text(12000)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    lengths = [1, 2, 3, 5, 8, 13, 17, 31, 32, 33, 64, 100, 150, 250, 400, 700]
    return [ids[i * 7: i * 7 + n] for i, n in enumerate(lengths)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_batched_greedy_equals_one_at_a_time(llm_fp32: LLM) -> None:
    prompts = [{"prompt_token_ids": p} for p in _prompts_of_varied_length(llm_fp32)]
    batched = _tokens(llm_fp32.generate(prompts, GREEDY))
    single = [_tokens(llm_fp32.generate([p], GREEDY))[0] for p in prompts]
    assert batched == single


def _fresh(llm: LLM, **kwargs) -> LLM:
    return LLM(str(llm.engine.loaded.source), dtype="float32", quantized_weights="dequantize", **kwargs)


def test_prefix_caching_same_outputs_and_hits(llm_fp32: LLM) -> None:
    system = "You are a meticulous math tutor. Explain every step, check the arithmetic twice, and answer briefly. " * 3
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in gsm8k_questions(6)]
    on = llm_fp32  # prefix caching is on by default
    off = _fresh(llm_fp32, kv_cache_memory="64MiB", enable_prefix_caching=False)
    on.engine.kv_manager.reset_prefix_cache()
    queries0, hits0 = on.engine.kv_manager.prefix_cache_queries, on.engine.kv_manager.prefix_cache_hits
    with_cache = _tokens(on.chat(chats, GREEDY))
    without = _tokens(off.chat(chats, GREEDY))
    assert with_cache == without
    hits = on.engine.kv_manager.prefix_cache_hits - hits0
    queries = on.engine.kv_manager.prefix_cache_queries - queries0
    assert hits > 0 and hits / queries > 0.2
    assert off.engine.kv_manager.prefix_cache_hits == 0


def test_preemption_under_tiny_kv_budget_gives_same_outputs(llm_fp32: LLM) -> None:
    prompts = [{"prompt_token_ids": p} for p in _prompts_of_varied_length(llm_fp32)[:15]]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = _tokens(llm_fp32.generate(prompts, params))
    # 48 blocks x 16 tokens: far less than the ~1,700 tokens these requests need at once.
    kv_bytes = 48 * 16 * llm_fp32.engine.model_config.kv_bytes_per_token(2)  # auto under fp32: a float16 cache
    small = _fresh(llm_fp32, kv_cache_memory=kv_bytes)
    assert small.engine.kv_budget.num_blocks == 48
    outs = _tokens(small.generate(prompts, params))
    assert small.engine.scheduler.num_preemptions > 0
    assert outs == reference
    assert small.engine.kv_manager.get_num_free_blocks() == 48


def test_fully_cached_prompt_and_same_step_sharing(llm_fp32: LLM) -> None:
    ids = llm_fp32.tokenizer.encode(long_text(3000), add_special_tokens=False)[:64]  # exactly 4 blocks
    prompt = {"prompt_token_ids": ids}
    first = _tokens(llm_fp32.generate([prompt], GREEDY))[0]
    again = llm_fp32.generate([prompt], GREEDY)[0]  # 100% cached prompt: last token recomputed
    assert again.outputs[0].token_ids == first
    assert again.num_cached_tokens == 48
    llm_fp32.engine.kv_manager.reset_prefix_cache()
    both = llm_fp32.generate([prompt, prompt], GREEDY)  # two sharers scheduled in the same step
    assert _tokens(both) == [first, first]
    assert both[1].num_cached_tokens > 0


def test_abort_mid_prefill_frees_blocks(llm_fp32: LLM) -> None:
    engine = llm_fp32.engine
    free_before = engine.kv_manager.get_num_free_blocks()
    ids = llm_fp32.tokenizer.encode(long_text(20000), add_special_tokens=False)[:1500]
    rid = engine.add_request({"prompt_token_ids": ids}, GREEDY)
    engine.step()  # one 512-token chunk of a 1,500-token prompt
    request = engine.scheduler.requests[rid]
    assert 0 < request.num_computed_tokens < len(ids)
    engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.get_num_free_blocks() == free_before


def test_n_greater_than_one_shares_prompt(llm_fp32: LLM) -> None:
    llm_fp32.engine.kv_manager.reset_prefix_cache()
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=12)
    ids = llm_fp32.tokenizer.encode(long_text(3000), add_special_tokens=False)[:70]
    out = llm_fp32.generate([{"prompt_token_ids": ids}], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert out.num_cached_tokens == 0 and llm_fp32.engine.kv_manager.prefix_cache_hits >= 64


def test_prompt_too_long_is_rejected_clearly(llm_fp32: LLM) -> None:
    with pytest.raises(ValueError, match="context length"):
        llm_fp32.generate([{"prompt_token_ids": [1] * 9000}], GREEDY)
    assert not llm_fp32.engine.has_unfinished_requests()
