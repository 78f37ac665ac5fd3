"""Multi-step decode (kiln.engine.multi_step + kiln.worker.multi_step) against single-step decoding.

The reference is the engine itself with `num_scheduler_steps=1`: every request must get the same
tokens, text and finish reason, greedy and sampled (seeded, and unseeded from the same global seed),
with stop tokens and stop strings landing inside a trip, requests of different lengths finishing at
different steps, and float32 / bfloat16 / int8-KV models; the trips must actually have run, and every
KV block must be back in the pool afterwards.
"""

from __future__ import annotations

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.kernels.native import load_native
from kiln.worker import multi_step

pytestmark = pytest.mark.skipif(not load_native(), reason="multi-step trips run the fused native decode step")

PROMPTS = ["the cat sat on the mat", "hello world " * 6, "he sat in the hat", "a b c d e f g", "one two"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def _generate(path, steps: int, params, dtype: str = "float32", kv_cache_dtype: str = "auto",
              global_seed: int | None = None, monkeypatch=None):
    """Outputs (token ids, text, finish reason) per request, and how many trips ran."""
    from loader.tiny_model import one_torch_thread

    trips = []
    if monkeypatch is not None:
        real = multi_step.run_trip
        monkeypatch.setattr("kiln.worker.model_runner.run_trip",
                            lambda r, items, k, *rest: trips.append(k) or real(r, items, k, *rest))
    with one_torch_thread():
        llm = LLM(str(path), dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory=1 << 20,
                  max_num_batched_tokens=64, num_scheduler_steps=steps)
        if global_seed is not None:
            torch.manual_seed(global_seed)
        outs = llm.generate(PROMPTS, params)
        engine = llm.engine
        assert engine.kv_manager.get_num_free_blocks() == engine.kv_budget.num_blocks  # nothing leaked
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs], trips


@pytest.mark.parametrize("variant, dtype, kv_cache_dtype", [("untied", "float32", "auto"), ("tied", "float32", "int8"),
                                                            ("untied", "bfloat16", "auto")])
def test_greedy_identical_to_single_steps(tiny, variant, dtype, kv_cache_dtype, monkeypatch) -> None:
    # different max_tokens per request: rows reach their budget at different steps, so trips shrink
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (23, 9, 31, 2, 17)]
    single, none = _generate(tiny.gguf[variant], 1, params, dtype, kv_cache_dtype, monkeypatch=monkeypatch)
    assert none == []
    multi, trips = _generate(tiny.gguf[variant], 4, params, dtype, kv_cache_dtype, monkeypatch=monkeypatch)
    assert trips and max(trips) == 4 and 2 <= min(trips)
    assert multi == single


def test_seeded_and_unseeded_sampling_identical(tiny, monkeypatch) -> None:
    params = [SamplingParams(temperature=0.9, top_k=20, seed=1, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, top_p=0.8, seed=2, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.05, max_tokens=20, ignore_eos=True),  # global generator
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.2, seed=5, max_tokens=20, ignore_eos=True)]
    single, _ = _generate(tiny.gguf["untied"], 1, params, global_seed=123)
    multi, trips = _generate(tiny.gguf["untied"], 8, params, global_seed=123, monkeypatch=monkeypatch)
    assert max(trips) == 8
    assert multi == single
    other, _ = _generate(tiny.gguf["untied"], 8, params, global_seed=124)
    assert [o[0] for o in other][2] != [m[0] for m in multi][2]  # control: the unseeded row does use the seed


def test_stop_tokens_and_strings_inside_a_trip(tiny, monkeypatch) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference, _ = _generate(tiny.gguf["untied"], 1, greedy)
    # stop on the 6th generated token of request 0, and on the text of request 1's tokens 3..4
    stop_token = reference[0][0][5]
    stop_text = reference[1][1][len(reference[1][1]) // 3:len(reference[1][1]) // 3 + 3]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_token]),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop_text]),
              greedy, greedy, greedy]
    single, _ = _generate(tiny.gguf["untied"], 1, params)
    multi, trips = _generate(tiny.gguf["untied"], 8, params, monkeypatch=monkeypatch)
    assert trips and multi == single
    assert single[0][2] == "stop" and single[0][0][-1] == stop_token and len(single[0][0]) <= 6
    assert single[1][2] == "stop" and stop_text not in single[1][1]


def test_requests_the_trip_cannot_serve_run_single_steps(tiny, monkeypatch) -> None:
    """logprobs and penalties need the sampler's full path: those batches never become trips."""
    params = [SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True)] * 2 + [
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    multi, trips = _generate(tiny.gguf["untied"], 4, params, monkeypatch=monkeypatch)
    single, _ = _generate(tiny.gguf["untied"], 1, params)
    assert multi == single
    # only once those requests are done (they all stop at 12 tokens) could the last one have tripped: never
    assert trips == []


def test_bad_step_count_is_one_clear_error(tiny) -> None:
    with pytest.raises(ValueError, match="num_scheduler_steps must be >= 1"):
        LLM(str(tiny.gguf["tied"]), num_scheduler_steps=0)


def test_blocks_a_trip_filled_are_prefix_cached_like_single_steps(tiny) -> None:
    """A follow-up turn (prompt + reply) must hit the blocks the reply's trips filled, as after single steps."""
    from loader.tiny_model import one_torch_thread

    # 11 prompt tokens + 30 generated: KV for 40 tokens = 10 full blocks of 4; the last trip (5 steps from
    # position 35) completes block 9 (36..39), which only an allocation after the trip can hash
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    hits = {}
    with one_torch_thread():
        for steps in (1, 8):
            llm = LLM(str(tiny.gguf["untied"]), kv_cache_memory=1 << 20, max_num_batched_tokens=64, block_size=4,
                      num_scheduler_steps=steps)
            first = llm.generate([{"prompt_token_ids": list(range(3, 14))}], greedy)[0]
            follow = list(range(3, 14)) + list(first.outputs[0].token_ids) + [5, 6]
            hits[steps] = llm.generate([{"prompt_token_ids": follow}], greedy)[0].num_cached_tokens
    assert hits[1] == 40 and hits[8] == hits[1]


def test_an_interrupt_ends_the_trip_after_its_current_step(tiny, monkeypatch) -> None:
    """The async engine sets `trip_interrupt` (true while a new request or an abort waits): trips then
    last one step, so neither waits longer than that, and the tokens are still those of single steps."""
    from loader.tiny_model import one_torch_thread

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    single, _ = _generate(tiny.gguf["untied"], 1, params)
    lengths = []
    real = multi_step.run_trip

    def recording(runner, items, k, interrupt=None):
        out = real(runner, items, k, interrupt)
        lengths.append(len(next(iter(out.sampled.values()))))
        return out

    monkeypatch.setattr("kiln.worker.model_runner.run_trip", recording)
    with one_torch_thread():
        llm = LLM(str(tiny.gguf["untied"]), kv_cache_memory=1 << 20, max_num_batched_tokens=64, num_scheduler_steps=8)
        llm.engine.trip_interrupt = lambda: True
        outs = llm.generate(PROMPTS, params)
    assert lengths and set(lengths) == {1}  # planned as trips, each cut after its first step
    assert [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs] == single
    assert llm.engine.kv_manager.get_num_free_blocks() == llm.engine.kv_budget.num_blocks
