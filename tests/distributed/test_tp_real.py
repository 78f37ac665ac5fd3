"""TP=3 against TP=1 on the real default model (9 query heads, 3 KV heads: 3 heads and 1 KV head per rank),
fp32 activations over its Q4_1/Q8_0 blocks: greedy outputs token for token on 8 chat prompts of 64 new
tokens, and the teacher-forced logits of prompt + output within 1e-4 relative."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import LLM, SamplingParams
from kiln.bench.data import gsm8k_questions

from .test_tensor_parallel import _assert_close_relative, _teacher_forced, _tokens

pytestmark = pytest.mark.real_model


def test_default_model_tp3_matches_tp1(default_gguf_path: Path) -> None:
    # fp32 activations and an fp32 KV cache: a 16-bit cache rounds K/V that differ by one fp32 ulp between
    # TP sizes (the partial sums add up in another order) to values one fp16 ulp apart (~5e-4 relative).
    options = {"dtype": "float32", "kv_cache_dtype": "float32", "threads": 1, "kv_cache_memory": "128MiB"}
    tp1 = LLM(str(default_gguf_path), **options)
    prompts = [tp1.tokenizer.encode(tp1.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in gsm8k_questions(8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    expected = _tokens(tp1, prompts, greedy)
    tp3 = LLM(str(default_gguf_path), tensor_parallel_size=3, **options)
    try:
        assert tp3.engine.runner.model.layers[0].self_attn.num_kv_heads == 1
        assert _tokens(tp3, prompts, greedy) == expected
        forced = [p + g for p, g in zip(prompts, expected)]
        _assert_close_relative(_teacher_forced(tp1, forced), _teacher_forced(tp3, forced))
    finally:
        tp3.engine.close()
