"""n-gram speculative decoding on the real default model: greedy output token-for-token equal
to plain decoding, inside continuous batching with prefix caching, with drafts accepted."""

from __future__ import annotations

import pytest

from kiln import LLM, SamplingParams

pytestmark = pytest.mark.real_model

PROMPTS = [
    "Repeat this list three times: apple, banana, cherry, date, elderberry.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Copy the sentence exactly: The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Count: 1, 2, 3, 4, 5, 6, 7, 8,",
]


@pytest.fixture(scope="module")
def spec_llm(llm_fp32) -> LLM:
    return LLM(str(llm_fp32.engine.loaded.source), dtype="float32", kv_cache_memory="128MiB",
               quantized_weights="dequantize", speculative_model="ngram", num_speculative_tokens=4,
               speculative_adaptive=False, speculative_disable_by_batch_size=8)  # drafts in every step, batched too


def test_greedy_with_ngram_drafts_equals_plain_decoding(llm_fp32, spec_llm) -> None:
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = llm_fp32.generate(PROMPTS, params)
    before = spec_llm.engine.stats().spec.accepted_total
    spec = spec_llm.generate(PROMPTS, params)
    for a, b in zip(spec, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, a.prompt
        assert a.outputs[0].text == b.outputs[0].text
    engine = spec_llm.engine
    assert engine.stats().spec.accepted_total - before > 20  # these prompts repeat: drafts must land
    assert engine.kv_manager.get_num_free_blocks() == engine.kv_budget.num_blocks  # nothing leaked


def test_stops_inside_accepted_drafts_cut_the_output(llm_fp32, spec_llm) -> None:
    """max_tokens and stop strings that fall in the middle of an accepted run of drafts."""
    for params in (SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=40, stop=["cherry"])):
        a = spec_llm.generate(PROMPTS[:1], params)[0].outputs[0]
        b = llm_fp32.generate(PROMPTS[:1], params)[0].outputs[0]
        assert a.text == b.text and a.finish_reason == b.finish_reason
        if params.max_tokens == 7:
            assert a.token_ids == b.token_ids and len(a.token_ids) == 7


def test_seeded_sampling_with_drafts_is_reproducible(spec_llm) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=32, logprobs=1)
    first = spec_llm.generate(PROMPTS[:2], params)
    again = spec_llm.generate(PROMPTS[:2], params)
    for a, b in zip(first, again):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].logprobs) == len(a.outputs[0].token_ids)


def test_per_request_k_bounds_drafts_and_zero_turns_speculation_off(llm_fp32, spec_llm) -> None:
    """num_speculative_tokens in SamplingParams: 0 verifies no drafts, 2 at most 2 per step, output unchanged."""
    engine = spec_llm.engine
    plain = llm_fp32.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for k, most in ((0, 0), (2, 2)):
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, num_speculative_tokens=k)
        proposed, steps = engine.stats().spec.proposed_total, engine.stats().spec.steps_total
        out = spec_llm.generate(PROMPTS[:1], params)
        assert out[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
        spec = engine.stats().spec
        n_proposed, n_steps = spec.proposed_total - proposed, spec.steps_total - steps
        assert n_proposed <= most * n_steps
        assert (n_proposed > 0) == (k > 0)  # this prompt repeats: with k > 0 drafts are proposed


def test_bad_per_request_k_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SamplingParams(num_speculative_tokens=17)


def test_switch_off_skips_large_batches_and_counts_them(llm_fp32) -> None:
    llm = LLM(str(llm_fp32.engine.loaded.source), dtype="float32", kv_cache_memory="128MiB",
              quantized_weights="dequantize", speculative_model="ngram", num_speculative_tokens=4,
              speculative_disable_by_batch_size=1)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = llm_fp32.generate(PROMPTS, params)
    out = llm.generate(PROMPTS, params)  # 4 sequences > 1: no step speculates until only one is left
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in plain]
    stats = llm.engine.stats()
    assert stats.spec.skipped_steps_total > 0
    assert stats.spec.proposed_total == 0  # all four decode in lockstep and finish together


def test_adaptive_switch_off_spares_seeded_sampling(llm_fp32, monkeypatch) -> None:
    """When the controller says speculation does not pay, greedy requests stop drafting but a
    seeded sampled one keeps drafting, so its output never depends on measured timings."""
    llm = LLM(str(llm_fp32.engine.loaded.source), dtype="float32", kv_cache_memory="128MiB",
              quantized_weights="dequantize", speculative_model="ngram", num_speculative_tokens=4)
    engine = llm.engine
    assert engine.spec is not None and engine.spec.controller.adaptive
    monkeypatch.setattr(engine.spec.controller, "should_speculate", lambda num_running: False)
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert engine.stats().spec.proposed_total == 0 and engine.stats().spec.skipped_steps_total > 0
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=24, ignore_eos=True)
    first = llm.generate(PROMPTS[:1], seeded)[0].outputs[0].token_ids
    assert engine.stats().spec.proposed_total > 0
    monkeypatch.undo()
    assert llm.generate(PROMPTS[:1], seeded)[0].outputs[0].token_ids == first



def test_greedy_on_block_kernels_with_ngram_drafts_equals_plain_decoding(default_gguf_path) -> None:
    """On the native block kernels (the default path): plain decoding runs 1-row matmuls inside the fused
    step, verifying k = 8 drafts runs 9-row ones (on the block kernel's 2 x 4 tile, or the panel kernel where
    the crossover table says so), and the tokens must still be the same."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    common = dict(kv_cache_memory="64MiB", quantized_weights="native")
    plain = LLM(str(default_gguf_path), **common).generate(PROMPTS, params)
    spec_llm = LLM(str(default_gguf_path), speculative_model="ngram", num_speculative_tokens=8,
                   speculative_adaptive=False, speculative_disable_by_batch_size=8, **common)
    spec = spec_llm.generate(PROMPTS, params)
    for a, b in zip(spec, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, a.prompt
    assert spec_llm.engine.stats().spec.accepted_total > 20
