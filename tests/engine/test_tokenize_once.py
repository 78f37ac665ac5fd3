"""A prompt is tokenized and validated once on its way in: by `process_prompt`, wherever it was
called (the server, AsyncEngine.add_request, LLMEngine.add_request), never again downstream."""

from __future__ import annotations

import asyncio

import pytest

from kiln.config import CacheConfig
from kiln.engine.async_engine import AsyncEngine
from kiln.engine.llm_engine import LLMEngine, TokenizedPrompt
from kiln.loader.model_loader import load_model
from kiln.sampling_params import SamplingParams

from loader.tiny_model import build_tiny_models, one_torch_thread

PARAMS = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    tiny = build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")
    return LLMEngine(load_model(tiny.hf["tied"], dtype="float32"), CacheConfig(kv_cache_memory=4 << 20))


@pytest.fixture()
def counts(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    seen = {"encode": 0, "validate": 0}
    encode, validate = engine.tokenizer.encode, engine.validate_prompt

    def counting_encode(*args, **kwargs):
        seen["encode"] += 1
        return encode(*args, **kwargs)

    def counting_validate(*args, **kwargs):
        seen["validate"] += 1
        return validate(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", counting_encode)
    monkeypatch.setattr(engine, "validate_prompt", counting_validate)
    return seen


def test_process_prompt_once_then_add_request_takes_it_as_is(engine: LLMEngine, counts: dict[str, int]) -> None:
    prompt = engine.process_prompt("the cat")
    assert isinstance(prompt, TokenizedPrompt) and prompt.text == "the cat" and prompt.token_ids
    assert counts == {"encode": 1, "validate": 1}
    assert engine.process_prompt(prompt) is prompt
    with one_torch_thread():
        rid = engine.add_request(prompt, PARAMS)
        final = engine.run_until_done()[rid]
    assert counts == {"encode": 1, "validate": 1}
    assert final.prompt == "the cat" and final.prompt_token_ids == prompt.token_ids
    assert len(final.outputs[0].token_ids) == 3


def test_a_raw_prompt_is_processed_once_by_add_request(engine: LLMEngine, counts: dict[str, int]) -> None:
    with one_torch_thread():
        rid = engine.add_request("the cat", PARAMS)
        engine.run_until_done()
    assert counts == {"encode": 1, "validate": 1} and rid
    with pytest.raises(ValueError, match="empty"):
        engine.process_prompt([])


def test_async_add_request_processes_once_and_the_engine_thread_not_again(engine: LLMEngine,
                                                                          counts: dict[str, int]) -> None:
    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def run() -> list[int]:
        stream = async_engine.add_request("the cat", PARAMS)
        last = None
        async for out in stream:
            last = out
        assert last is not None and last.finished
        return last.outputs[0].token_ids

    try:
        with one_torch_thread():
            tokens = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert len(tokens) == 3 and counts == {"encode": 1, "validate": 1}
