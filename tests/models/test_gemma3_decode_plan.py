"""Gemma 3's fused decode step (kiln.models.gemma3_decode_plan) against its plain path, exactly.

The plain path is checked against transformers in tests/models/test_gemma3.py; here the same engine runs
with the fused step on and off (hybrid and plain KV cache, fp32 and bf16, float16 and float32 caches,
contexts past the window) and the tokens and top-5 logprobs must be identical — and the plan must have run.
"""

from __future__ import annotations

import pytest
import torch

from kiln import SamplingParams
from kiln.config import CacheConfig, SchedulerConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.loader.model_loader import load_model
from kiln.models import gemma3_decode_plan

from loader.tiny_model import one_torch_thread
from models.tiny_gemma3 import WINDOW

PROMPTS = [list(range(5, 5 + 3)), list(range(9, 9 + 2 * WINDOW + 3)), list(range(20, 20 + WINDOW))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _generate(tiny_gemma3_gguf, fused: bool, hybrid: bool, dtype: str, kv_dtype: str) -> tuple[list, str]:
    loaded = load_model(tiny_gemma3_gguf, dtype=dtype, quantized_weights="dequantize")
    loaded.model.fused_decode_step = fused
    if not hybrid:
        loaded.model.supports_kv_groups = False
    cache = CacheConfig(block_size=4, kv_cache_memory=1 << 21, kv_cache_dtype=kv_dtype)
    engine = LLMEngine(loaded, cache, SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))
    params = SamplingParams(temperature=0, max_tokens=3 * WINDOW, logprobs=5, ignore_eos=True)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in PROMPTS]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                o = out.outputs[0]
                done[out.request_id] = (o.token_ids, [sorted(lp.items()) for lp in o.logprobs])
    assert engine.kv_manager.get_num_free_blocks() == engine.kv_budget.num_blocks
    return [done[i] for i in ids], loaded.model.decode_plan_status


@pytest.mark.parametrize("hybrid", [True, False])
@pytest.mark.parametrize("dtype, kv_dtype", [("float32", "float32"), ("float32", "float16"), ("bfloat16", "bfloat16")])
def test_fused_step_equals_the_plain_path(tiny_gemma3_gguf, hybrid, dtype, kv_dtype, monkeypatch) -> None:
    calls = []
    real = gemma3_decode_plan.run_gemma3_plan
    monkeypatch.setattr(gemma3_decode_plan, "run_gemma3_plan", lambda *a: calls.append(1) or real(*a))
    fused, status = _generate(tiny_gemma3_gguf, True, hybrid, dtype, kv_dtype)
    plain, plain_status = _generate(tiny_gemma3_gguf, False, hybrid, dtype, kv_dtype)
    assert status == "fused native decode step (Gemma 3)" and plain_status.startswith("plain path")
    assert len(calls) >= 3 * WINDOW - 1  # every pure decode step went through the plan
    assert fused == plain


def test_int8_cache_and_other_steps_keep_the_plain_path(tiny_gemma3_gguf) -> None:
    from kiln.kernels.attention_metadata import build_attention_metadata

    def caches(kv_dtype: str):
        loaded = load_model(tiny_gemma3_gguf, dtype="float32", quantized_weights="dequantize")
        engine = LLMEngine(loaded, CacheConfig(block_size=4, kv_cache_memory=1 << 21, kv_cache_dtype=kv_dtype),
                           SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))
        return engine.runner.kv_caches

    hidden = torch.zeros(1, 64)
    decode = build_attention_metadata([1], [5], [[0, 1]], 4)
    assert gemma3_decode_plan.can_run(decode, hidden, caches("float32"))  # control: a float cache takes the plan
    assert not gemma3_decode_plan.can_run(decode, hidden, caches("int8"))  # a quantized cache: the plain path
    prefill = build_attention_metadata([3], [5], [[0, 1]], 4)
    assert not gemma3_decode_plan.can_run(prefill, torch.zeros(3, 64), caches("float32"))  # a prefill chunk


@pytest.mark.real_model
def test_real_gemma3_fused_step_equals_the_plain_path() -> None:
    """gemma3-270m with its Q4_K / Q6_K / Q5_0 / Q8_0 blocks on the native kernels, hybrid cache."""
    from kiln import LLM
    from kiln.hub import pull

    path = pull("gemma3-270m")
    chats = ["Write one sentence about the moon.", "List three prime numbers."]
    runs = []
    for fused in (True, False):
        llm = LLM(str(path), kv_cache_memory="128MiB", fused_decode_step=fused)
        tok = llm.tokenizer
        prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]),
                                                   add_special_tokens=False)} for c in chats]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, logprobs=3))
        runs.append(([o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]))
        assert llm.engine.loaded.model.decode_plan_status.startswith("fused" if fused else "plain")
    assert runs[0] == runs[1]
