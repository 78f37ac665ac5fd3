"""Multi-step trips on Gemma 3 (its own fused plan, kiln.models.gemma3_decode_plan) against single steps.

The reference is the same engine with `num_scheduler_steps=1`. Gemma 3 runs its sliding-window layers
on the hybrid KV cache (one block table per layer group, windows sliding out blocks), so a trip must
index every group's table, and the blocks a trip passes must still leave the windows during
generation. Tokens must be identical (greedy and seeded sampling, fp32 and bf16, hybrid and plain
cache), the trips must have run, and every block must be back in the pool afterwards.
"""

from __future__ import annotations

import pytest

from kiln import SamplingParams
from kiln.config import CacheConfig, SchedulerConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.kernels.native import load_native
from kiln.loader.model_loader import load_model
from kiln.worker import multi_step

from loader.tiny_model import one_torch_thread
from models.tiny_gemma3 import WINDOW

pytestmark = pytest.mark.skipif(not load_native(), reason="multi-step trips run the fused native decode step")

BLOCK = 4
# one short prompt, one past two windows, one exactly a window: rows cross window edges at different steps
PROMPTS = [list(range(5, 8)), list(range(9, 9 + 2 * WINDOW + 3)), list(range(20, 20 + WINDOW))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _generate(tiny_gemma3_gguf, steps: int, params: list[SamplingParams], hybrid: bool = True, dtype: str = "float32",
              monkeypatch=None) -> tuple[list, list[int], int]:
    """(token ids per request, trip lengths planned, the most blocks one request held at once)."""
    trips: list[int] = []
    if monkeypatch is not None:
        real = multi_step.run_trip
        monkeypatch.setattr("kiln.worker.model_runner.run_trip",
                            lambda r, items, k, *rest: trips.append(k) or real(r, items, k, *rest))
    loaded = load_model(tiny_gemma3_gguf, dtype=dtype, quantized_weights="dequantize")
    if not hybrid:
        loaded.model.supports_kv_groups = False
    engine = LLMEngine(loaded, CacheConfig(block_size=BLOCK, kv_cache_memory=1 << 21, kv_cache_dtype="auto"),
                       SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, num_scheduler_steps=steps))
    assert (engine.runner.layer_group is not None) == hybrid
    ids = [engine.add_request({"prompt_token_ids": p}, sp) for p, sp in zip(PROMPTS, params)]
    done, most_held = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if hybrid:
            most_held = max([most_held] + [engine.kv_manager.num_blocks_held(i) for i in ids])
    assert engine.kv_manager.get_num_free_blocks() == engine.kv_budget.num_blocks  # nothing leaked
    return [done[i] for i in ids], trips, most_held


@pytest.mark.parametrize("hybrid", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_trips_equal_single_steps(tiny_gemma3_gguf, hybrid, dtype, monkeypatch) -> None:
    # different lengths: rows leave the batch at different steps, so trips shrink and the batch changes
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3 * WINDOW, 2 * WINDOW + 1, 9)]
    single, none, _ = _generate(tiny_gemma3_gguf, 1, params, hybrid, dtype, monkeypatch)
    assert none == []
    multi, trips, _ = _generate(tiny_gemma3_gguf, 4, params, hybrid, dtype, monkeypatch)
    assert multi == single
    assert trips and max(trips) == 4


def test_seeded_sampling_trips_equal_single_steps(tiny_gemma3_gguf, monkeypatch) -> None:
    params = [SamplingParams(temperature=0.9, top_k=20, seed=1, max_tokens=2 * WINDOW, ignore_eos=True),
              SamplingParams(temperature=0.7, top_p=0.8, seed=2, max_tokens=2 * WINDOW, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=2 * WINDOW, ignore_eos=True)]
    single, _, _ = _generate(tiny_gemma3_gguf, 1, params)
    multi, trips, _ = _generate(tiny_gemma3_gguf, 8, params, monkeypatch=monkeypatch)
    assert max(trips) == 8
    assert multi == single


def test_windows_still_free_blocks_during_trips(tiny_gemma3_gguf) -> None:
    """A long generation holds the global group's blocks plus a bounded window per sliding group, with
    trips as without: a trip's lookahead adds at most one block per group beyond a single step's bound."""
    params = [SamplingParams(temperature=0, max_tokens=6 * WINDOW, ignore_eos=True)] * 3
    single, _, held_single = _generate(tiny_gemma3_gguf, 1, params)
    multi, _, held_multi = _generate(tiny_gemma3_gguf, 8, params)
    assert multi == single
    longest = len(PROMPTS[1]) + 6 * WINDOW
    global_blocks = -(-longest // BLOCK)
    # the tiny model: 5 sliding layers and 1 global, planned as groups of one layer each
    bound = global_blocks + 5 * (WINDOW // BLOCK + 1 + -(-8 // BLOCK))
    assert held_single <= bound and held_multi <= bound
    assert held_multi < 6 * global_blocks  # control: far below a cache that never frees
