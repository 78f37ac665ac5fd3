"""Replicas on Ray Serve (`kiln serve --replicas`): how to split the cores, and what prefix routing buys.

In one run, on the default model, each configuration a fresh `kiln serve` process:

1. 64 streaming clients (GSM8K chat questions, 64 requests at once, 48 new tokens, greedy):
   1 replica x 2 threads and 2 replicas x 1 thread (prefix routing, and Ray's default routing), and with
   --plain `kiln serve` alone (2 threads, no Ray: the cost of the Ray hop) — output tok/s, TTFT p50/p95, errors.
2. A multi-turn chat workload on 2 replicas x 1 thread: 16 conversations at once, each 4 turns (a
   shared system prompt, then GSM8K questions; every turn resends the whole history with the model's
   greedy replies), 24 new tokens a turn — kiln's prefix-affinity routing against Ray Serve's default
   (power of two choices): the replicas' prefix-cache hit rate (prompt tokens found in the cache /
   prompt tokens looked up, summed over the replicas' own counters in /metrics) and TTFT p50/p95 over
   the turns after the first (the ones a cache can help) and over all turns.

Writes benchmarks/results/replicas.json. Meant to finish in under 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from single_stream_peers import machine  # noqa: E402

OUT = Path(__file__).parent / "results" / "replicas.json"
CLIENTS, REQUESTS, TOKENS = 64, 64, 48
CONVERSATIONS, TURNS, TURN_TOKENS = 16, 4, 24
SYSTEM = ("You are a patient mathematics tutor. Read each word problem carefully, name the quantities it gives, "
          "write the arithmetic one step per line, check the result against the question, and finish with the "
          "answer on its own line. Keep every explanation short and plain.")


def counter(text: str, name: str) -> float:
    """A counter summed over the replicas (or the one engine) in a /metrics text."""
    return sum(float(m[1]) for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def wait_replicas(url: str, n: int, timeout: float = 300) -> None:
    """Until `n` replicas report their metrics (the ingress answers once one replica is up)."""
    deadline = time.monotonic() + timeout
    while counter(metrics(url), "kiln:replicas_reporting") < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} replicas did not come up in {timeout:.0f}s")
        time.sleep(1)


def server_cmd(model: str, port: int, threads: int, replicas: int | None, routing: str = "prefix") -> list[str]:
    from kiln.bench.serving import kiln_server_cmd

    cmd = kiln_server_cmd(model, port, "auto") + ["--threads", str(threads), "--no-ui"]
    if replicas is not None:
        cmd += ["--replicas", str(replicas), "--replica-routing", routing]
    return cmd


def clients_run(url: str, prompts: list[str]) -> dict[str, Any]:
    from kiln.bench.load_generator import run_load, summarize

    asyncio.run(run_load(url, "bench", prompts[:8], 16, None, 8))  # warm-up: every replica's first steps
    results, elapsed = asyncio.run(run_load(url, "bench", prompts, TOKENS, None, CLIENTS))
    s = summarize(results, elapsed)
    return {"output_tok_s": s["output_tok_s"], "errors": s["errors"], "first_error": s["first_error"],
            "requests": len(prompts), "elapsed_s": elapsed, "ttft_p50_s": s["ttft_s"]["p50"],
            "ttft_p95_s": s["ttft_s"]["p95"], "tpot_p50_s": s["tpot_s"]["p50"]}


async def chat_turn(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]]) -> tuple[float, str]:
    """One streamed turn: (TTFT, the reply's text)."""
    body = {"model": "bench", "messages": messages, "max_tokens": TURN_TOKENS, "temperature": 0.0, "stream": True}
    start = time.perf_counter()
    ttft, parts = None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    parts.append(piece)
    return (ttft if ttft is not None else time.perf_counter() - start), "".join(parts)


async def conversations(url: str, questions: list[list[str]]) -> list[tuple[int, float]]:
    """All conversations at once, each turn after the last one's reply: [(turn, TTFT)]."""
    out: list[tuple[int, float]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)) as client:
        async def one(qs: list[str]) -> None:
            messages = [{"role": "system", "content": SYSTEM}]
            for turn, q in enumerate(qs):
                messages.append({"role": "user", "content": q})
                ttft, reply = await chat_turn(client, url, messages)
                messages.append({"role": "assistant", "content": reply})
                out.append((turn, ttft))

        await asyncio.gather(*(one(qs) for qs in questions))
    return out


def routing_run(url: str, questions: list[list[str]]) -> dict[str, Any]:
    from kiln.bench.load_generator import percentiles

    before = metrics(url)
    start = time.perf_counter()
    ttfts = asyncio.run(conversations(url, questions))
    elapsed = time.perf_counter() - start
    time.sleep(3.5)  # the replicas push their counters about once a second
    after = metrics(url)
    queries = counter(after, "kiln:prefix_cache_queries_total") - counter(before, "kiln:prefix_cache_queries_total")
    hits = counter(after, "kiln:prefix_cache_hits_total") - counter(before, "kiln:prefix_cache_hits_total")
    later = percentiles([t for turn, t in ttfts if turn > 0])
    every = percentiles([t for _, t in ttfts])
    return {"prefix_hit_rate": hits / queries if queries else 0.0, "prompt_tokens_looked_up": queries,
            "prompt_tokens_hit": hits, "turns": len(ttfts), "elapsed_s": elapsed,
            "ttft_later_turns_p50_s": later["p50"], "ttft_later_turns_p95_s": later["p95"],
            "ttft_all_turns_p50_s": every["p50"], "ttft_all_turns_p95_s": every["p95"]}


def main() -> None:
    from kiln.bench.data import gsm8k_questions
    from kiln.bench.serving import free_port, running_server
    from kiln.planner.calibration import read_bandwidth_gb_s

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plain", action="store_true", help="also `kiln serve` without Ray (the cost of the Ray hop)")
    args = parser.parse_args()
    prompts = gsm8k_questions(REQUESTS)
    pool = gsm8k_questions(REQUESTS + CONVERSATIONS * TURNS)[REQUESTS:]  # not the clients' questions
    chats = [pool[i * TURNS:(i + 1) * TURNS] for i in range(CONVERSATIONS)]
    result: dict[str, Any] = {
        "benchmark": "replicas", "model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**machine(read_bandwidth_gb_s()), "threads": "per configuration"},
        "clients": {"clients": CLIENTS, "requests": REQUESTS, "new_tokens": TOKENS, "runs": {}},
        "routing": {"conversations": CONVERSATIONS, "turns": TURNS, "new_tokens_per_turn": TURN_TOKENS,
                    "replicas": 2, "threads_per_replica": 1, "runs": {}},
    }
    t0 = time.time()
    configs = [("1 replica x 2 threads", 2, 1), ("2 replicas x 1 thread", 1, 2)]
    if args.plain:
        configs.insert(0, ("kiln serve, 2 threads (no Ray)", 2, None))
    for name, threads, replicas in configs:
        port = free_port()
        with running_server(server_cmd(args.model, port, threads, replicas), port, threads, startup_timeout=900) as url:
            if replicas:
                wait_replicas(url, replicas)
            result["clients"]["runs"][name] = clients_run(url, prompts)
            print(name, result["clients"]["runs"][name], flush=True)
            if replicas == 2:  # the same server: prefix routing on the multi-turn chats
                result["routing"]["runs"]["prefix affinity (kiln)"] = routing_run(url, chats)
                print("prefix", result["routing"]["runs"]["prefix affinity (kiln)"], flush=True)
    port = free_port()
    with running_server(server_cmd(args.model, port, 1, 2, "pow2"), port, 1, startup_timeout=900) as url:
        wait_replicas(url, 2)
        # the clients' run first, as on the prefix server: the same warm-up, and the single-turn figures
        result["clients"]["runs"]["2 replicas x 1 thread, Ray default routing"] = clients_run(url, prompts)
        result["routing"]["runs"]["power of two choices (Ray default)"] = routing_run(url, chats)
        print("pow2", result["routing"]["runs"]["power of two choices (Ray default)"], flush=True)
    runs = result["clients"]["runs"]
    result["clients"]["ratio_2x1_over_1x2"] = (runs["2 replicas x 1 thread"]["output_tok_s"]
                                               / runs["1 replica x 2 threads"]["output_tok_s"])
    if args.plain:
        result["clients"]["ratio_ray_1x2_over_plain"] = (runs["1 replica x 2 threads"]["output_tok_s"]
                                                         / runs["kiln serve, 2 threads (no Ray)"]["output_tok_s"])
    result["machine"]["load_average_end"] = os.getloadavg()[0]
    result["elapsed_s"] = time.time() - t0
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
