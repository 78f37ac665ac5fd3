"""The OpenAI API as the official `openai` client sees it, against a real uvicorn server."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.real_model

MODEL = "kiln-test-model"  # the served name in conftest

CHAT = [{"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0.0}
IGNORE_EOS = {"ignore_eos": True}


def _stream_text(chunks, index: int = 0) -> str:
    return "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == index)


def _finishes(chunks, index: int = 0) -> list[str]:
    return [ch.finish_reason for c in chunks for ch in c.choices if ch.index == index and ch.finish_reason]


def test_chat_stream_matches_non_stream(client) -> None:
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, **GREEDY)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _stream_text(chunks) == choice.message.content
    assert _finishes(chunks) == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_matches_non_stream_and_ends_with_done(client, server) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    full = client.completions.create(model=MODEL, prompt=body["prompt"], max_tokens=10, extra_body=IGNORE_EOS, **GREEDY)
    assert full.object == "text_completion"
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"

    with httpx.stream("POST", server.v1 + "/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == full.choices[0].text
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_prompt_list_and_echo(client, server) -> None:
    prompts = ["One, two,", "Red, green,"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, echo=True, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, choice in zip(prompts, out.choices):
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    # token-id prompts work too, and give the same continuation as the text they spell
    ids = httpx.post(server.url + "/tokenize", json={"prompt": prompts[0]}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, **GREEDY)
    assert out.choices[0].text == prompts[0] + by_ids.choices[0].text


def test_n_2_chat_and_stream(client) -> None:
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, temperature=0.9, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.message.content for c in out.choices)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, n=2, temperature=0.9, seed=7, stream=True))
    for i in (0, 1):
        assert _stream_text(chunks, i) == out.choices[i].message.content  # same seed, same text
        assert len(_finishes(chunks, i)) == 1


def test_chat_logprobs(client) -> None:
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=3, extra_body=IGNORE_EOS, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert "".join(e.token for e in content) == out.choices[0].message.content

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=3, stream=True, extra_body=IGNORE_EOS, **GREEDY))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_completion_logprobs(client) -> None:
    out = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=5, logprobs=2, extra_body=IGNORE_EOS, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)


def test_stop_string(client) -> None:
    kwargs = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "extra_body": IGNORE_EOS, **GREEDY}
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {text!r}"
    out = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **kwargs) if c.choices)
    assert streamed == out.text


def test_seed_reproducible(client) -> None:
    kwargs = {"model": MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_models_and_health(client, server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200


def test_tokenize_detokenize_round_trip(client, server) -> None:
    text = "Hello world, this is kiln! 🚀"
    tok = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == server.engine.max_model_len
    detok = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == text
    # /tokenize with messages counts exactly the prompt tokens a chat request uses
    chat_tok = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    usage = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1).usage
    assert chat_tok["count"] == usage.prompt_tokens


def test_metrics_move_after_a_request(client, server, metrics) -> None:
    scrape, wait_idle = metrics
    before = wait_idle(server)
    for name in (
        "kiln:num_requests_running", "kiln:num_requests_waiting", "kiln:kv_cache_usage_perc",
        "kiln:kv_cache_blocks_in_use", "kiln:time_to_first_token_seconds_count",
        "kiln:time_per_output_token_seconds_count", "kiln:inter_token_latency_seconds_count",
        "kiln:e2e_request_latency_seconds_count", "kiln:prompt_tokens_total", "kiln:generation_tokens_total",
        "kiln:prefix_cache_queries_total", "kiln:prefix_cache_hits_total", "kiln:num_preemptions_total",
        'kiln:request_success_total{finish_reason="length"}',
    ):
        assert name in before, name
    out = client.completions.create(model=MODEL, prompt="Count: 1, 2,", max_tokens=5, extra_body=IGNORE_EOS, **GREEDY)
    after = wait_idle(server)
    assert after['kiln:request_success_total{finish_reason="length"}'] == before['kiln:request_success_total{finish_reason="length"}'] + 1
    assert after["kiln:generation_tokens_total"] - before["kiln:generation_tokens_total"] == 5
    assert after["kiln:prompt_tokens_total"] - before["kiln:prompt_tokens_total"] == out.usage.prompt_tokens
    for hist in ("time_to_first_token", "e2e_request_latency", "time_per_output_token"):
        key = f"kiln:{hist}_seconds_count"
        assert after[key] == before[key] + 1, key
    # one gap per output after the first, and one output per token even when a multi-step trip brings 4 at once
    assert after["kiln:inter_token_latency_seconds_count"] - before["kiln:inter_token_latency_seconds_count"] == 4
    assert after["kiln:prefix_cache_queries_total"] >= before["kiln:prefix_cache_queries_total"]
