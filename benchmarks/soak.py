"""A long day of traffic, compressed: `kiln serve` under a mixed open-loop load, watched for leaks.

kiln issue 23. One `kiln serve` process (the default model, 2 threads, n-gram speculation on,
a small --max-queue) receives Poisson arrivals for DURATION seconds of eight kinds of request:

- chat_stream     streaming chat (GSM8K question), sampled with a seed, usage requested
- chat_full       non-streaming chat
- completion_n2   /v1/completions with n=2
- stop_strings    streaming chat with stop strings (the stop text must not reach the client)
- long_prompt     a ~1,500-token Shakespeare prompt, streaming completion
- spec            a code-copying prompt with num_speculative_tokens=4 (greedy)
- disconnect      a streaming chat the client abandons after 3 chunks
- queue_abort     a non-streaming request whose client gives up after 0.3 s (often still queued)

and, every BURST_EVERY seconds, a burst of BURST_SIZE short requests at once, above --max-queue, so
some are refused with 503 + Retry-After.

Every response that completes is checked whole: a stream ends with [DONE] and every choice with a
finish_reason (and usage agrees with max_tokens when it hit the length limit); a non-streaming body
has its n choices; no stop string appears in the text. Once a minute the server process's RSS,
threads and open file descriptors, and its KV blocks in use (/metrics), are sampled with the p95
latency (end-to-end and TTFT) of the requests that finished in that minute. After the load the
script waits until the engine is idle and reads the KV blocks in use again.

Must show (the verdicts in the result file): every completed response whole; refused ones 503 with
Retry-After; KV blocks in use back to 0 after the load; RSS growth over the last 20 minutes < 2 %;
no 5xx other than the queue's 503.

Writes benchmarks/results/soak.json (rendered into the README by benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kiln.bench.data import gsm8k_questions
from kiln.bench.serving import free_port, running_server_process
from kiln.data import HUMANEVAL, SHAKESPEARE, data_path

OUT = Path(__file__).parent / "results" / "soak.json"
PLOT = Path(__file__).parent / "results" / "soak.svg"
THREADS = 2
MAX_QUEUE = 24
KINDS = {  # kind → share of arrivals
    "chat_stream": 0.25, "chat_full": 0.15, "completion_n2": 0.10, "stop_strings": 0.10,
    "long_prompt": 0.10, "spec": 0.10, "disconnect": 0.12, "queue_abort": 0.08,
}
STOPS = ["\n\n", "."]


@dataclass
class Outcome:
    kind: str
    started: float
    ended: float = 0.0
    status: int = 0  # HTTP status; 0: the client gave up (disconnect / timeout by design)
    ttft: float | None = None
    whole: bool | None = None  # None: not a completed response
    problem: str = ""
    retry_after: bool = False


@dataclass
class Workload:
    questions: list[str]
    long_prompt: str
    code_prompts: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(0))


def build_workload() -> Workload:
    text = data_path(SHAKESPEARE).read_text(encoding="utf-8")
    code = [json.loads(line)["prompt"] for line in data_path(HUMANEVAL).read_text().splitlines()[:40]]
    return Workload(gsm8k_questions(400), text[:6000], code)


def _chat_body(w: Workload, **fields: Any) -> dict[str, Any]:
    return {"model": "soak", "messages": [{"role": "user", "content": w.rng.choice(w.questions)}], **fields}


def _check_stream_events(events: list[dict[str, Any]], n: int, max_tokens: int) -> str:
    """'' when the stream is whole, else what is wrong with it."""
    finish: dict[int, str] = {}
    usage = None
    for event in events:
        if "error" in event:
            return f"error event: {event['error'].get('message', '')[:120]}"
        for choice in event.get("choices", []):
            if choice.get("finish_reason"):
                finish[choice["index"]] = choice["finish_reason"]
        usage = event.get("usage") or usage
    if sorted(finish) != list(range(n)):
        return f"finish_reason for choices {sorted(finish)}, expected {n}"
    if any(reason not in ("stop", "length") for reason in finish.values()):
        return f"unexpected finish reasons {finish}"
    if usage is not None and n == 1 and finish[0] == "length" and usage["completion_tokens"] != max_tokens:
        return f"finish_reason length after {usage['completion_tokens']} of {max_tokens} tokens"
    return ""


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, Any], out: Outcome,
                  abandon_after: int | None = None) -> str:
    """POST a streaming request; the text received (all choices joined), checking it is whole."""
    events: list[dict[str, Any]] = []
    text = ""
    async with client.stream("POST", path, json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            out.retry_after = "retry-after" in r.headers
            return ""
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            events.append(event)
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                if piece:
                    out.ttft = out.ttft or time.monotonic() - out.started
                    text += piece
            if abandon_after is not None and len(events) >= abandon_after:
                out.status = 0  # abandoned by design
                return text
    problem = "" if done else "stream ended without [DONE]"
    problem = problem or _check_stream_events(events, body.get("n", 1), body.get("max_tokens", 0))
    out.whole, out.problem = not problem, problem
    return text


async def one_request(client: httpx.AsyncClient, w: Workload, kind: str, t0: float) -> Outcome:
    out = Outcome(kind, time.monotonic())
    seed = w.rng.randrange(1 << 30)
    try:
        if kind == "chat_stream":
            await _stream(client, "/v1/chat/completions", _chat_body(
                w, stream=True, max_tokens=64, temperature=0.7, seed=seed,
                stream_options={"include_usage": True}), out)
        elif kind == "stop_strings":
            text = await _stream(client, "/v1/chat/completions", _chat_body(
                w, stream=True, max_tokens=96, temperature=0.7, seed=seed, stop=STOPS), out)
            if out.whole and any(s in text for s in STOPS):
                out.whole, out.problem = False, "a stop string reached the client"
        elif kind == "long_prompt":
            start = w.rng.randrange(0, len(w.long_prompt) // 2)
            await _stream(client, "/v1/completions", {
                "model": "soak", "prompt": w.long_prompt[start:], "max_tokens": 32, "stream": True,
                "temperature": 0.0, "stream_options": {"include_usage": True}}, out)
        elif kind == "spec":
            code = w.rng.choice(w.code_prompts)
            await _stream(client, "/v1/chat/completions", {
                "model": "soak", "messages": [{"role": "user", "content": f"Repeat this code exactly:\n{code}"}],
                "max_tokens": 64, "temperature": 0, "stream": True, "num_speculative_tokens": 4}, out)
        elif kind == "disconnect":
            await _stream(client, "/v1/chat/completions", _chat_body(
                w, stream=True, max_tokens=128, ignore_eos=True), out, abandon_after=3)
        elif kind in ("chat_full", "completion_n2", "queue_abort", "burst"):
            if kind == "completion_n2":
                path, n = "/v1/completions", 2
                body: dict[str, Any] = {"model": "soak", "prompt": w.rng.choice(w.questions), "n": 2,
                                        "max_tokens": 32, "temperature": 0.8, "seed": seed}
            else:
                path, n = "/v1/chat/completions", 1
                body = _chat_body(w, max_tokens=8 if kind == "burst" else 48, temperature=0.7, seed=seed)
            timeout = 0.3 if kind == "queue_abort" else 600.0
            try:
                r = await client.post(path, json=body, timeout=timeout)
            except httpx.TimeoutException:
                out.status = 0  # gave up by design: the server must abort it, wherever it was
                return out
            out.status = r.status_code
            out.retry_after = "retry-after" in r.headers
            if r.status_code == 200:
                choices = r.json()["choices"]
                ok = len(choices) == n and all(c.get("finish_reason") in ("stop", "length") for c in choices)
                out.whole, out.problem = ok, "" if ok else f"body with {len(choices)} choices: {choices}"[:200]
        else:
            raise ValueError(kind)
    except Exception as exc:  # any failure is recorded against this request, never lost
        out.status, out.problem = -1, f"{type(exc).__name__}: {exc}"[:200]
    finally:
        out.ended = time.monotonic()
    return out


def process_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "threads": int(fields["Threads"]),
            "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics", timeout=30)).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


def _p95(values: list[float]) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=20, method="inclusive")[18]


async def sample(client: httpx.AsyncClient, pid: int, t0: float, outcomes: list[Outcome], since: float) -> dict[str, Any]:
    metrics = await scrape(client)
    done = [o for o in outcomes if o.whole and o.ended >= since]
    return {
        "t_s": round(time.monotonic() - t0, 1), **process_stats(pid),
        "kv_blocks_in_use": metrics.get("kiln:kv_cache_blocks_in_use"),
        "running": metrics.get("kiln:num_requests_running"), "waiting": metrics.get("kiln:num_requests_waiting"),
        "completed": len(done),
        "e2e_p95_s": _p95([o.ended - o.started for o in done]),
        "ttft_p95_s": _p95([o.ttft for o in done if o.ttft is not None]),
    }


async def soak(url: str, pid: int, duration: float, rate: float, burst_every: float, burst_size: int,
               sample_every: float) -> dict[str, Any]:
    w = build_workload()
    kinds, weights = list(KINDS), list(KINDS.values())
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) as client:
        await client.post("/v1/chat/completions", json=_chat_body(w, max_tokens=4))  # warm-up
        t0 = time.monotonic()
        outcomes: list[Outcome] = []
        tasks: set[asyncio.Task] = set()
        samples = [await sample(client, pid, t0, outcomes, t0)]
        next_arrival, next_burst, next_sample, last_sample = t0, t0 + burst_every / 2, t0 + sample_every, t0

        def launch(kind: str) -> None:
            task = asyncio.create_task(one_request(client, w, kind, t0))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), outcomes.append(t.result())))

        while (now := time.monotonic()) < t0 + duration:
            if now >= next_arrival:
                launch(w.rng.choices(kinds, weights)[0])
                next_arrival += w.rng.expovariate(rate)
            if now >= next_burst:
                for _ in range(burst_size):
                    launch("burst")
                next_burst += burst_every
            if now >= next_sample:
                samples.append(await sample(client, pid, t0, outcomes, last_sample))
                last_sample, next_sample = now, next_sample + sample_every
                print(f"soak: {samples[-1]}", file=sys.stderr, flush=True)
            await asyncio.sleep(max(0.0, min(next_arrival, next_burst, next_sample) - time.monotonic()))
        load_end = time.monotonic()
        if tasks:
            await asyncio.wait(tasks, timeout=600)
        # idle: nothing running or waiting, then the KV blocks still held
        deadline = time.monotonic() + 120
        while True:
            metrics = await scrape(client)
            if (metrics.get("kiln:num_requests_running") == 0 and metrics.get("kiln:num_requests_waiting") == 0) \
                    or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        final = await sample(client, pid, t0, outcomes, last_sample)
        metrics = await scrape(client)
        return {"samples": samples, "final": final, "outcomes": outcomes, "load_s": load_end - t0,
                "drain_s": time.monotonic() - load_end, "engine_step_errors": metrics.get("kiln:engine_step_errors_total"),
                "kv_blocks_total": metrics.get("kiln:kv_cache_blocks_total")}


def summarize(run: dict[str, Any], duration: float) -> dict[str, Any]:
    outcomes: list[Outcome] = run["outcomes"]
    by_status = Counter(str(o.status) for o in outcomes)
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = by_kind.setdefault(o.kind, Counter())
        row["sent"] += 1
        row["completed_whole" if o.whole else ("incomplete" if o.whole is False else
                                               "abandoned_by_client" if o.status == 0 else f"status_{o.status}")] += 1
    refused = [o for o in outcomes if o.status == 503]
    incomplete = [o for o in outcomes if o.whole is False]
    other_errors = [o for o in outcomes if o.status not in (0, 200, 503)]
    samples = run["samples"]
    window_start = duration - 20 * 60
    tail = [s for s in samples if s["t_s"] >= window_start - 1] if duration >= 25 * 60 else samples[len(samples) // 3:]
    rss_growth = (tail[-1]["rss_bytes"] - tail[0]["rss_bytes"]) / tail[0]["rss_bytes"] if len(tail) >= 2 else None
    final = run["final"]
    verdicts = {
        "every_completed_response_whole": not incomplete,
        "refused_are_503_with_retry_after": all(o.retry_after for o in refused),
        "kv_blocks_back_to_zero": final["kv_blocks_in_use"] == 0,
        "rss_growth_last_20_min_under_2pct": rss_growth is not None and rss_growth < 0.02,
        "no_5xx_but_queue_503": not any(o.status >= 500 and o.status != 503 for o in outcomes),
        "no_client_errors": not other_errors,
    }
    return {
        "requests": len(outcomes), "by_status": dict(by_status), "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "refused_503": len(refused), "incomplete": len(incomplete),
        "incomplete_examples": [f"{o.kind}: {o.problem}" for o in incomplete[:5]],
        "other_errors": len(other_errors), "other_error_examples": [f"{o.kind} {o.status}: {o.problem}" for o in other_errors[:5]],
        "rss_growth_window": [tail[0]["t_s"], tail[-1]["t_s"]] if tail else None,
        "rss_growth_frac": rss_growth, "verdicts": verdicts, "all_met": all(verdicts.values()),
    }


def write_plot(result: dict[str, Any], path: Path = PLOT) -> None:
    """p95 latency, RSS and KV blocks in use per minute, as the README's figure."""
    sys.path.insert(0, str(Path(__file__).parent))
    from svg_plot import Panel, Series, line_chart

    samples = result["samples"] + [result["final"]]
    minutes = [s["t_s"] / 60 for s in samples]
    panels = [
        Panel("p95 latency of the requests finished in each minute", "seconds", [
            Series("end-to-end p95", list(zip(minutes, [s["e2e_p95_s"] for s in samples])), "#c0392b"),
            Series("time to first token p95", list(zip(minutes, [s["ttft_p95_s"] for s in samples])), "#2471a3"),
        ]),
        Panel("server process memory", "RSS (MiB)", [
            Series("RSS", list(zip(minutes, [s["rss_bytes"] / 2**20 for s in samples])), "#1e8449"),
        ]),
        Panel("KV cache and queue", "count", [
            Series("KV blocks in use", list(zip(minutes, [s["kv_blocks_in_use"] for s in samples])), "#7d3c98"),
            Series("requests waiting", list(zip(minutes, [s["waiting"] for s in samples])), "#b9770e"),
        ]),
    ]
    path.write_text(line_chart(panels, "minutes since the load started (last point: after the drain)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load (the issue asks >= 30 min)")
    parser.add_argument("--rate", type=float, default=0.8, help="mean arrivals per second (Poisson)")
    parser.add_argument("--burst-every", type=float, default=300.0)
    parser.add_argument("--burst-size", type=int, default=60)
    parser.add_argument("--sample-every", type=float, default=60.0)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="engine threads (1 when other work shares the cores: a 2-thread OpenMP team on "
                             "2 oversubscribed cores waits at every barrier for a descheduled thread)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from the result file")
    args = parser.parse_args()
    if args.replot:
        write_plot(json.loads(args.out.read_text()), args.out.with_suffix(".svg"))
        return

    port = free_port()
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "serve", "--model", args.model, "--port", str(port),
           "--served-model-name", "soak", "--log-level", "warning", "--threads", str(args.threads),
           "--max-queue", str(MAX_QUEUE), "--speculative-model", "ngram"]
    with running_server_process(cmd, port, args.threads) as (url, proc):
        run = asyncio.run(soak(url, proc.pid, args.duration, args.rate, args.burst_every, args.burst_size,
                               args.sample_every))
    summary = summarize(run, args.duration)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{cpu}, {os.cpu_count()} cores", "threads": args.threads,
        "command": " ".join(cmd[1:]).replace(str(port), "PORT"), "duration_s": args.duration, "rate": args.rate,
        "burst_every_s": args.burst_every, "burst_size": args.burst_size, "max_queue": MAX_QUEUE,
        "kinds": KINDS, "load_s": round(run["load_s"], 1), "drain_s": round(run["drain_s"], 1),
        "kv_blocks_total": run["kv_blocks_total"], "engine_step_errors": run["engine_step_errors"],
        **summary, "samples": run["samples"], "final": run["final"],
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip(),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    write_plot(result, args.out.with_suffix(".svg"))
    print(json.dumps({k: result[k] for k in ("requests", "by_status", "verdicts", "all_met", "rss_growth_frac")}, indent=1))


if __name__ == "__main__":
    main()
