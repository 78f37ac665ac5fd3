"""The default model under a budget of a third of its file (loaded by the streamed load: built on the meta device,
layer by layer into the spill file): greedy tokens and top-5 logprobs identical to the resident run."""

from __future__ import annotations

import pytest

from kiln import LLM, SamplingParams
from kiln.hub import pull

pytestmark = pytest.mark.real_model

CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is in two sentences."]


def _greedy(llm: LLM) -> list[tuple[list[int], list]]:
    tok = llm.tokenizer
    prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]),
                                               add_special_tokens=False)} for c in CHATS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, logprobs=5))
    return [(list(o.outputs[0].token_ids), [sorted(lp.items()) for lp in o.outputs[0].logprobs]) for o in outs]


def test_default_model_streams_two_thirds_of_its_weights_with_identical_output(tmp_path) -> None:
    budget = pull("smollm2-135m").stat().st_size // 3
    resident = _greedy(LLM("smollm2-135m", quantized_weights="native", kv_cache_memory="64MiB"))
    llm = LLM("smollm2-135m", max_weight_memory=budget, offload_dir=str(tmp_path), kv_cache_memory="64MiB")
    report = llm.engine.loaded.offload
    assert report.resident_bytes <= budget
    assert report.mapped_bytes > 2 * budget * 0.9  # most of the weights live in the file
    assert len(report.spilled_layers) >= 29
    assert _greedy(llm) == resident
    assert llm.engine.loaded.model.weight_streamer.spill.resident_bytes() == 0
