"""`kiln bench serve`: a load generator for any OpenAI-compatible server (kiln, llama.cpp's
llama-server, vLLM, ...).

Streaming chat completions, sent either open-loop with Poisson arrivals at `request_rate`
(seeded) or closed-loop with at most `max_concurrency` in flight. Per request it records the
time to first token (TTFT), every gap between content chunks (ITL), time per output token after
the first (TPOT) and end-to-end latency; the report gives their p50/p90/p95/p99, request and
token throughput, errors, and goodput (requests per second that met every SLO given). Tokens are
counted from the stream's usage chunk (`stream_options.include_usage`, which kiln and
llama-server send), since a busy server may put several tokens in one chunk.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kiln.data import GSM8K_TEST, MT_BENCH, data_path


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_chunks: int = 0
    usage_tokens: int | None = None  # completion_tokens of the stream's usage chunk, when the server sends one
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    retries: int = 0  # attempts after the first (connection dropped before any response)
    retryable: bool = False

    @property
    def output_tokens(self) -> int:
        """Tokens generated: the server's own count when it reported usage (a chunk may carry
        several tokens when a busy server coalesces them), else one per content chunk."""
        return self.usage_tokens if self.usage_tokens is not None else self.output_chunks

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def load_prompts(dataset: str, n: int) -> list[str]:
    """First user turns from the GSM8K / MT-Bench prompts shipped in kiln.data, or one prompt per line of a file."""
    if dataset in ("gsm8k", "mtbench"):
        name = GSM8K_TEST if dataset == "gsm8k" else MT_BENCH
        rows = [json.loads(line) for line in data_path(name).read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [r["question"] if dataset == "gsm8k" else r["turns"][0] for r in rows]
    else:
        path = Path(dataset)
        if not path.is_file():
            raise ValueError(f"--dataset must be gsm8k, mtbench or a text file with one prompt per line; got {dataset!r}")
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"no prompts in {dataset}")
    return [texts[i % len(texts)] for i in range(n)]  # cycle when asked for more than the set holds


# Like the official openai client (max_retries=2): a connection the server dropped before sending
# anything (a pooled keep-alive connection it had closed, a refused connect) is retried on a fresh
# one; the request's clock keeps running from the first attempt.
MAX_RETRIES = 2


async def stream_chat(client: httpx.AsyncClient, base_url: str, model: str, prompt: str, max_tokens: int,
                      headers: dict[str, str]) -> RequestResult:
    start = time.perf_counter()
    for attempt in range(MAX_RETRIES + 1):
        result = await _stream_once(client, base_url, model, prompt, max_tokens, headers, start)
        result.retries = attempt
        if not result.retryable or attempt == MAX_RETRIES:
            return result
    raise AssertionError("unreachable")


async def _stream_once(client: httpx.AsyncClient, base_url: str, model: str, prompt: str, max_tokens: int,
                       headers: dict[str, str], start: float) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    last = start
    result = RequestResult(False)
    try:
        async with client.stream("POST", base_url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.usage_tokens = chunk["usage"].get("completion_tokens")
                choices = chunk.get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if result.output_chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.output_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.retryable = result.output_chunks == 0 and isinstance(exc, (httpx.RemoteProtocolError, httpx.ConnectError))
        return result
    result.e2e_s = time.perf_counter() - start
    result.ok = result.output_chunks > 0
    result.error = "" if result.ok else "no tokens in the stream"
    return result


async def run_load(base_url: str, model: str, prompts: list[str], max_tokens: int, request_rate: float | None,
                   max_concurrency: int | None, seed: int = 0, api_key: str | None = None,
                   progress: bool = False) -> tuple[list[RequestResult], float]:
    """Send every prompt once; returns the results in prompt order and the wall time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="requests", unit="req")
    limits = httpx.Limits(max_connections=(max_concurrency or len(prompts)) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        offsets, t = [], 0.0
        for _ in prompts:
            offsets.append(t)
            if request_rate:
                t += rng.expovariate(request_rate)

        async def one(offset: float, prompt: str) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if gate is None:
                res = await stream_chat(client, base_url, model, prompt, max_tokens, headers)
            else:
                async with gate:
                    res = await stream_chat(client, base_url, model, prompt, max_tokens, headers)
            if bar is not None:
                bar.update(1)
            return res

        results = await asyncio.gather(*(one(o, p) for o, p in zip(offsets, prompts)))
        elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(results), elapsed


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]

    return {"mean": sum(ordered) / len(ordered), "p50": pick(50), "p90": pick(90), "p95": pick(95), "p99": pick(99)}


def summarize(results: list[RequestResult], elapsed: float, slo_ttft_s: float | None = None,
              slo_tpot_s: float | None = None) -> dict[str, Any]:
    good = [r for r in results if r.ok]

    def meets(r: RequestResult) -> bool:
        tpot = r.tpot_s
        return ((slo_ttft_s is None or r.ttft_s <= slo_ttft_s)
                and (slo_tpot_s is None or tpot is None or tpot <= slo_tpot_s))

    return {
        "num_requests": len(results),
        "errors": len(results) - len(good),
        "first_error": next((r.error for r in results if not r.ok), None),
        "retried_requests": sum(1 for r in results if r.retries),
        "elapsed_s": elapsed,
        "request_throughput": len(good) / elapsed,
        "output_tok_s": sum(r.output_tokens for r in good) / elapsed,
        "ttft_s": percentiles([r.ttft_s for r in good]),
        "tpot_s": percentiles([t for r in good if (t := r.tpot_s) is not None]),
        "itl_s": percentiles([x for r in good for x in r.itl_s]),
        "e2e_s": percentiles([r.e2e_s for r in good]),
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
        "goodput_req_s": sum(1 for r in good if meets(r)) / elapsed,
    }


def plot(runs: list[tuple[str, list[RequestResult], dict[str, Any]]], path: Path) -> None:
    """Latency CDFs (TTFT, TPOT, end-to-end) per run, and throughput vs p95 TTFT when several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 4 if len(runs) > 1 else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6))
    for label, results, _ in runs:
        good = [r for r in results if r.ok]
        for ax, values, title in ((axes[0], [r.ttft_s for r in good], "TTFT (s)"),
                                  (axes[1], [t for r in good if (t := r.tpot_s) is not None], "TPOT (s)"),
                                  (axes[2], [r.e2e_s for r in good], "end-to-end (s)")):
            xs = sorted(values)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
            ax.set_xlabel(title)
            ax.set_ylabel("fraction of requests")
    axes[0].legend(fontsize=7)
    if len(runs) > 1:
        axes[3].plot([s["output_tok_s"] for _, _, s in runs], [s["ttft_s"]["p95"] or 0 for _, _, s in runs], "o-")
        axes[3].set_xlabel("output tok/s")
        axes[3].set_ylabel("p95 TTFT (s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_serve_bench(base_url: str, model: str, dataset: str, num_prompts: int, max_tokens: int,
                    request_rates: list[float | None], max_concurrency: int | None, slo_ttft_s: float | None,
                    slo_tpot_s: float | None, api_key: str | None, plot_path: Path | None) -> dict[str, Any]:
    """One run per request rate (None: all at once / closed loop); JSON-ready report."""
    try:
        httpx.get(base_url.rstrip("/") + "/v1/models", timeout=5,
                  headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {base_url} ({type(exc).__name__}); is the server running?") from None
    prompts = load_prompts(dataset, num_prompts)
    runs = []
    for i, rate in enumerate(request_rates):
        results, elapsed = asyncio.run(run_load(base_url, model, prompts, max_tokens, rate, max_concurrency,
                                                seed=i, api_key=api_key, progress=True))
        summary = summarize(results, elapsed, slo_ttft_s, slo_tpot_s)
        summary.update(request_rate=rate, max_concurrency=max_concurrency)
        label = f"{rate:g} req/s" if rate else (f"concurrency {max_concurrency}" if max_concurrency else "all at once")
        runs.append((label, results, summary))
    if plot_path is not None:
        plot(runs, plot_path)
    return {"benchmark": "serve", "base_url": base_url, "model": model, "dataset": dataset,
            "num_prompts": num_prompts, "max_tokens": max_tokens, "date": time.strftime("%Y-%m-%d %H:%M"),
            "runs": [s for _, _, s in runs], "plot": str(plot_path) if plot_path else None}
