"""LoRA through the OpenAI server (tiny model, fast): the official `openai` client picks an adapter by
`model`, /v1/models lists the adapters, and POST /v1/load_lora_adapter / unload_lora_adapter load and
unload them at run time; a bad adapter is a 400 with the reason and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("peft", reason="LoRA reference tests need the test extras (peft)")
openai = pytest.importorskip("openai")

from server.conftest import serve_in_thread

from kiln.engine.arg_utils import EngineArgs
from kiln.engine.async_engine import AsyncEngine
from lora.conftest import Adapters

MODEL = "tiny-base"


@pytest.fixture(scope="module")
def url(adapters: Adapters) -> Iterator[str]:
    from kiln.entrypoints.openai.api_server import build_app

    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(adapters.base), dtype="float32", kv_cache_memory="8MiB",
                                                     loras=[f"a={adapters.a}"], max_loras=2, max_lora_rank=8))
    try:
        with serve_in_thread(build_app(engine, MODEL, ui=False)) as base_url:
            yield base_url
    finally:
        engine.shutdown(timeout=5.0)


def _complete(client, model: str, prompt: list[int]) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert r.model == model
    return r.choices[0].text


def test_openai_client_picks_the_adapter_by_model(adapters: Adapters, url: str) -> None:
    from openai import OpenAI

    with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        ids = [m.id for m in client.models.list().data]
        assert ids == [MODEL, "a"]
        p = adapters.prompts[0]
        tokens_a = adapters.expected("a", p)
        tokens_base = adapters.expected("base", p)
        assert tokens_a != tokens_base
        text_a, text_base = _complete(client, "a", p), _complete(client, MODEL, p)
        assert text_a == _decode(url, tokens_a) and text_base == _decode(url, tokens_base)
        chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hello cat"}],
                                              max_tokens=4, temperature=0)
        assert chat.model == "a" and chat.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError, match="`tiny-base`, `a`"):
            client.completions.create(model="nope", prompt="hi", max_tokens=2)


def test_load_and_unload_at_run_time(adapters: Adapters, url: str, tmp_path) -> None:
    from openai import OpenAI

    bad = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "none")})
    assert bad.status_code == 400 and "no such adapter folder" in bad.json()["error"]["message"]
    ok = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters.b)})
    assert ok.status_code == 200, ok.text
    dup = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters.b)})
    assert dup.status_code == 400 and "already loaded" in dup.json()["error"]["message"]
    p = adapters.prompts[1]
    with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        assert [m.id for m in client.models.list().data] == [MODEL, "a", "b"]
        assert _complete(client, "b", p) == _decode(url, adapters.expected("b", p))
        gone = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "b"})
        assert gone.status_code == 200, gone.text
        assert [m.id for m in client.models.list().data] == [MODEL, "a"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="b", prompt=p, max_tokens=2)
        # still serving the base model and the other adapter
        assert _complete(client, MODEL, p) == _decode(url, adapters.expected("base", p))
    missing = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert missing.status_code == 404


def _decode(url: str, tokens: list[int]) -> str:
    r = httpx.post(url + "/detokenize", json={"tokens": tokens})
    return r.json()["prompt"]
