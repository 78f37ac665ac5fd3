"""`kiln bench serve` (the load generator) against a real kiln server: open and closed loop,
percentiles that are ordered, goodput bounded by throughput, a PNG written, errors counted."""

from __future__ import annotations

import asyncio

import pytest

from kiln.bench.load_generator import load_prompts, run_load, run_serve_bench, summarize

pytestmark = pytest.mark.real_model

MODEL = "kiln-test-model"


def test_open_and_closed_loop_report(server, tmp_path) -> None:
    png = tmp_path / "serve.png"
    report = run_serve_bench(server.url, MODEL, "mtbench", num_prompts=6, max_tokens=4, request_rates=[20.0, None],
                             max_concurrency=None, slo_ttft_s=60.0, slo_tpot_s=60.0, api_key=None, plot_path=png)
    assert len(report["runs"]) == 2
    for run in report["runs"]:
        assert run["errors"] == 0 and run["num_requests"] == 6
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            p = run[metric]
            assert 0 < p["p50"] <= p["p90"] <= p["p95"] <= p["p99"], (metric, p)
        assert run["ttft_s"]["p99"] <= run["e2e_s"]["p99"]
        assert run["goodput_req_s"] == pytest.approx(run["request_throughput"])  # generous SLOs: all good
        assert run["output_tok_s"] > 0
    assert png.stat().st_size > 10_000


def test_prompts_cycle_when_more_are_asked_for(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("one\n\ntwo\n")
    assert load_prompts(str(f), 5) == ["one", "two", "one", "two", "one"]


def test_closed_loop_completes_and_a_tight_slo_cuts_goodput_to_zero(server, metrics) -> None:
    results, elapsed = asyncio.run(run_load(server.url, MODEL, load_prompts("gsm8k", 4), 4, None, max_concurrency=1))
    summary = summarize(results, elapsed, slo_ttft_s=1e-9)
    assert summary["errors"] == 0 and summary["goodput_req_s"] == 0.0
    # tokens are the server's usage count (a chunk may carry several), never fewer than the chunks
    assert all(r.usage_tokens is not None and r.output_chunks <= r.output_tokens <= 4 for r in results)
    scrape, wait_idle = metrics
    assert wait_idle(server)["kiln:kv_cache_blocks_in_use"] == 0


def test_errors_are_counted_not_raised(server) -> None:
    results, elapsed = asyncio.run(run_load(server.url, "no-such-model", ["hi", "there"], 4, None, None))
    summary = summarize(results, elapsed)
    assert summary["errors"] == 2 and "404" in summary["first_error"]


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot reach"):
        run_serve_bench("http://127.0.0.1:9", MODEL, "gsm8k", 1, 4, [None], None, None, None, None, None)


def test_bad_dataset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--dataset"):
        load_prompts("no/such/file.txt", 2)


def test_a_connection_dropped_before_any_response_is_retried_like_the_openai_client() -> None:
    """A pooled connection the server had closed surfaces as RemoteProtocolError before any byte;
    the load generator retries it (up to twice, as openai's client does) and counts the retry."""
    import httpx

    from kiln.bench.load_generator import MAX_RETRIES, stream_chat

    calls = []
    sse = ('data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
           'data: {"choices":[],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n')

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    async def run(h):
        async with httpx.AsyncClient(transport=httpx.MockTransport(h)) as client:
            return await stream_chat(client, "http://x", "m", "hello", 4, {})

    result = asyncio.run(run(handler))
    assert result.ok and result.retries == 1 and result.output_tokens == 3 and len(calls) == 2

    def always_drops(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    result = asyncio.run(run(always_drops))
    assert not result.ok and result.retries == MAX_RETRIES and "RemoteProtocolError" in result.error
