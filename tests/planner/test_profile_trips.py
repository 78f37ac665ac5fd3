"""`kiln advise`'s measured profile on an engine that runs multi-step trips: a trip of k decode steps is
recorded as k decode steps (not one k-times-longer step), so the decode step time and the step count
agree with single-step decoding's."""

from __future__ import annotations

import pytest

from kiln import LLM
from kiln.kernels.native import load_native
from kiln.planner.profile import run_profile
from kiln.planner.workload import WorkItem

pytestmark = pytest.mark.skipif(not load_native(), reason="multi-step trips run the fused native decode step")


def test_trips_count_as_their_decode_steps(tmp_path, monkeypatch) -> None:
    from loader.tiny_model import build_tiny_models, one_torch_thread

    import kiln.planner.profile as profile_module

    recorded: dict[int, list[tuple[float, int, int]]] = {}
    real = profile_module._summarise

    def capture(config, concurrency, items, prompts, elapsed, steps, *rest):
        recorded[config["steps"]] = list(steps)
        return real(config, concurrency, items, prompts, elapsed, steps, *rest)

    monkeypatch.setattr(profile_module, "_summarise", capture)
    tiny = build_tiny_models(tmp_path / "tiny")
    items = [WorkItem(({"role": "user", "content": f"hello {i}"},), 24) for i in range(2)]
    profiles = {}
    with one_torch_thread():
        for steps in (1, 4):
            llm = LLM(str(tiny.gguf["untied"]), kv_cache_memory=1 << 20, max_num_batched_tokens=64,
                      num_scheduler_steps=steps)
            profiles[steps] = run_profile(llm.engine, items, concurrency=2, config={"steps": steps})
    assert profiles[4].output_tokens == profiles[1].output_tokens == 48
    decode = {k: [s for s in v if s[1] == 0] for k, v in recorded.items()}
    # both requests decode 23 tokens after their first: 23 decode steps either way (a trip is split
    # into its steps, each with its share of the trip's time), not ~6 trips
    assert len(decode[1]) == len(decode[4]) == 23
    assert len({t for t, _, _ in decode[4]}) < len(decode[4])  # some steps did come from one trip
