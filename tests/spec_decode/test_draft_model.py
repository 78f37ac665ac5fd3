"""Both proposers (n-gram and a draft model) on the real default model: greedy output token for
token equal to plain decoding on 10 prompts, one request at a time and 4 at once; no KV block of
the target or of the draft leaks, aborts included; a draft with another tokenizer is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import LLM, SamplingParams
from kiln.spec_decode.draft_model import DraftModelProposer

pytestmark = pytest.mark.real_model

PROMPTS = [
    "Repeat this list three times: apple, banana, cherry, date, elderberry.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Copy the sentence exactly: The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Count: 1, 2, 3, 4, 5, 6, 7, 8,",
    "The capital of France is",
    "Write a haiku about the sea.",
    "Q: What is 12 times 12?\nA:",
    "Translate to French: Good morning, how are you?",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "Once upon a time, in a small village,",
]
PARAMS = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(llm_fp32) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm_fp32.generate(PROMPTS, PARAMS)]


def _spec_llm(llm_fp32, name: str) -> LLM:
    return LLM(str(llm_fp32.engine.loaded.source), dtype="float32", kv_cache_memory="128MiB",
               quantized_weights="dequantize", speculative_model=name, num_speculative_tokens=4,
               speculative_adaptive=False, speculative_disable_by_batch_size=8)  # drafts in every step, batched too


@pytest.fixture(scope="module", params=["ngram", "self:int8"])
def spec_llm(request, llm_fp32) -> LLM:
    return _spec_llm(llm_fp32, request.param)


def _assert_no_leaks(llm: LLM) -> None:
    engine = llm.engine
    assert engine.kv_manager.get_num_free_blocks() == engine.kv_budget.num_blocks
    draft = engine.spec.proposer
    if isinstance(draft, DraftModelProposer):
        assert draft.block_pool.get_num_free_blocks() == draft.block_pool.num_blocks
        assert not draft.seqs


@pytest.mark.parametrize("batch", [1, 4], ids=["single", "batched"])
def test_greedy_equals_plain_decoding(spec_llm: LLM, plain: list[list[int]], batch: int) -> None:
    before = spec_llm.engine.stats().spec.accepted_total
    out: list[list[int]] = []
    for i in range(0, len(PROMPTS), batch):  # 4 at once stays under the speculation switch-off (4 running)
        out += [o.outputs[0].token_ids for o in spec_llm.generate(PROMPTS[i:i + batch], PARAMS)]
    for prompt, a, b in zip(PROMPTS, out, plain):
        assert a == b, prompt
    assert spec_llm.engine.stats().spec.accepted_total - before > 40  # drafts really were accepted
    _assert_no_leaks(spec_llm)


def test_aborts_leak_no_blocks(llm_fp32) -> None:
    llm = _spec_llm(llm_fp32, "self:int8")
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=40)) for p in PROMPTS[:4]]
    for _ in range(4):
        engine.step()
    assert engine.spec.proposer.seqs  # the draft holds KV for running requests
    engine.abort_request(ids[:2])
    while engine.has_unfinished_requests():
        engine.step()
    _assert_no_leaks(llm)


def test_draft_with_another_tokenizer_is_refused(llm_fp32, tmp_path_factory: pytest.TempPathFactory) -> None:
    from loader.tiny_model import build_tiny_models

    tiny = build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        _spec_llm(llm_fp32, str(tiny.hf["tied"]))
    with pytest.raises(ValueError, match="self:int4 or self:int8"):
        _spec_llm(llm_fp32, "self:int2")
