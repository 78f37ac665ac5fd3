"""The hybrid KV cache in the engine, on a tiny random Gemma 3 (window 8, five local layers, one global).

The reference is the same model on kiln's plain paged cache (one table for every layer, nothing
freed; the windows are still masked by the attention), which tests/models/test_gemma3.py checks
against transformers. A 4,000-token conversation must generate identically and keep the blocks in
use bounded by the global layer's tokens plus each local group's window; prefix hits after the
window slid and preemptions under a small pool must not change any output either.
"""

from __future__ import annotations

import pytest
import torch

from kiln import SamplingParams
from kiln.config import CacheConfig, SchedulerConfig
from kiln.core.hybrid_kv_cache_manager import HybridKVCacheManager
from kiln.core.kv_cache_manager import KVCacheManager
from kiln.engine.llm_engine import LLMEngine
from kiln.loader.model_loader import load_model

from loader.tiny_model import one_torch_thread
from models.tiny_gemma3 import WINDOW

BS, CHUNK = 4, 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _engine(tiny_gemma3_gguf, hybrid: bool, kv_memory: int, max_num_seqs: int = 8, chunk: int = CHUNK) -> LLMEngine:
    loaded = load_model(tiny_gemma3_gguf, dtype="float32", quantized_weights="dequantize")
    if not hybrid:
        loaded.model.supports_kv_groups = False  # the plain cache: the never-freeing reference
    cache = CacheConfig(block_size=BS, kv_cache_memory=kv_memory, kv_cache_dtype="float32")
    return LLMEngine(loaded, cache, SchedulerConfig(max_num_batched_tokens=chunk, max_num_seqs=max_num_seqs))


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, on_step=None) -> list[list[int]]:
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if on_step is not None:
            on_step(engine)
    return [done[i] for i in ids]


def test_a_4000_token_conversation_is_bounded_and_identical(tiny_gemma3_gguf) -> None:
    prompt = [(i * 7919) % 250 + 3 for i in range(3000)]
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    hybrid = _engine(tiny_gemma3_gguf, True, 4 << 20)
    assert isinstance(hybrid.kv_manager, HybridKVCacheManager)
    n_local = sum(g.window is not None for g in hybrid.kv_groups)
    n_global = len(hybrid.kv_groups) - n_local
    assert (n_local, n_global) == (5, 1)
    worst = {"prefill": 0, "decode": 0}

    def check(engine: LLMEngine) -> None:
        req = next(iter(engine.scheduler.requests.values()), None)
        if req is None:
            return
        in_use = engine.kv_manager.num_blocks - engine.kv_manager.get_num_free_blocks()
        beyond_global = in_use - n_global * -(-req.num_computed_tokens // BS)
        # The last prompt chunk's blocks go back at the first decode step's allocation.
        phase = "prefill" if req.num_computed_tokens <= len(prompt) else "decode"
        worst[phase] = max(worst[phase], beyond_global)

    got = _run(hybrid, [prompt], params, check)[0]
    window_blocks = -(-WINDOW // BS) + 1
    assert worst["decode"] <= n_local * (window_blocks + 1)  # + the block of the token being decoded
    assert worst["prefill"] <= n_local * (window_blocks + -(-CHUNK // BS)) + n_global * -(-CHUNK // BS)
    assert hybrid.kv_manager.get_num_free_blocks() == hybrid.kv_manager.num_blocks

    plain = _engine(tiny_gemma3_gguf, False, 4 << 20)
    assert isinstance(plain.kv_manager, KVCacheManager)
    assert got == _run(plain, [prompt], params)[0]
    assert len(got) == 1000


def _conversations() -> list[list[int]]:
    return [[(i * 31 + s * 17) % 250 + 3 for i in range(90 + 10 * s)] for s in range(3)]


def test_prefix_hits_after_the_window_slid_match_the_plain_cache(tiny_gemma3_gguf) -> None:
    """Turn two of three conversations reuses turn one's prefix, whose early local blocks were given
    back long ago: the hit must bring the window's blocks and still generate what the plain cache does."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    hybrid = _engine(tiny_gemma3_gguf, True, 1 << 20, max_num_seqs=3, chunk=32)
    plain = _engine(tiny_gemma3_gguf, False, 1 << 20, max_num_seqs=3, chunk=32)
    first = _conversations()
    turn1 = _run(hybrid, first, params)
    assert turn1 == _run(plain, first, params)
    second = [p + out + [7, 8, 9, 10, 11] for p, out in zip(first, turn1)]
    before = hybrid.kv_manager.prefix_cache_hits
    turn2 = _run(hybrid, second, params)
    hits = hybrid.kv_manager.prefix_cache_hits - before
    assert hits >= sum((len(p) + 40) // BS * BS for p in first) - 3 * BS  # (nearly) every whole block of turn one
    assert turn2 == _run(plain, second, params)


def test_preemption_under_a_small_pool_matches_the_plain_cache(tiny_gemma3_gguf) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    # 25 plain blocks of 6 layers' K/V = 150 hybrid blocks of one layer: under two sequences at once
    hybrid = _engine(tiny_gemma3_gguf, True, 150 * 512, max_num_seqs=3, chunk=32)
    plain = _engine(tiny_gemma3_gguf, False, 1 << 20, max_num_seqs=3, chunk=32)
    prompts = _conversations()
    assert _run(hybrid, prompts, params) == _run(plain, prompts, params)
    assert hybrid.scheduler.num_preemptions > 0 and plain.scheduler.num_preemptions == 0
    assert hybrid.kv_manager.get_num_free_blocks() == hybrid.kv_manager.num_blocks
