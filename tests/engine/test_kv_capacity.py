"""A sequence always fits the KV cache on its own: the engine caps the context at the pool.

Without the cap, a request that outgrew the whole pool (max_model_len above the pool's tokens) had
nothing left to preempt but itself and was never scheduled again: the engine stepped forever
(found by tests/core/test_scheduler_state_machine.py).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def test_context_capped_at_a_small_pool_and_long_requests_finish(tiny) -> None:
    from kiln import LLM, SamplingParams

    # 256 bytes of fp16 K+V per token on the tiny model: 16 KiB is 4 blocks = 64 tokens (context 256)
    llm = LLM(str(tiny.gguf["tied"]), dtype="float32", kv_cache_memory=16 << 10, enable_prefix_caching=False)
    engine = llm.engine
    assert engine.kv_budget.num_tokens == 64 and engine.max_model_len == 64
    assert "(64 tokens)" in engine.kv_budget.describe()
    engine.add_request("the cat sat on the mat", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    finished = []
    for _ in range(200):  # bounded: a stuck request must fail the test, not hang it
        finished += [o for o in engine.step() if o.finished]
        if not engine.has_unfinished_requests():
            break
    assert len(finished) == 1 and finished[0].outputs[0].finish_reason == "length"
    assert len(finished[0].prompt_token_ids) + len(finished[0].outputs[0].token_ids) == 64
    assert engine.kv_manager.get_num_free_blocks() == engine.kv_budget.num_blocks
    with pytest.raises(ValueError, match="KV cache holds only 64"):
        engine.add_request(list(range(3, 80)), SamplingParams(max_tokens=1))
