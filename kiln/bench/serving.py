"""Serving benchmark: one load generator against kiln's server and llama-cpp-python's server.

Each server runs as its own process on a free loopback port with the same model file and thread
count, and is measured by the same client in the same run. Requests are streaming chat
completions of GSM8K questions, sent open-loop with Poisson arrivals (seeded, so both servers
see the same arrival times) for a fixed arrival window at each of a sweep of request rates. A rate is *sustained* when the p95
time-to-first-token stays under the SLO; the figure of merit is the highest sustained rate, and
kiln's is reported as a ratio to the peer's.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx

from kiln.bench.load_generator import run_load, summarize


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kiln_server_cmd(model: str, port: int, dtype: str) -> list[str]:
    return [sys.executable, "-m", "kiln.entrypoints.cli", "serve", "--model", model, "--port", str(port),
            "--dtype", dtype, "--served-model-name", "bench", "--log-level", "warning"]


def llama_cpp_server_cmd(gguf: Path, port: int, threads: int, n_ctx: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
            "--host", "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(n_ctx), "--model_alias", "bench", "--verbose", "False",
            # its default cancels the streaming request whenever a new one arrives; queue them instead
            "--interrupt_requests", "False"]


@contextmanager
def running_server(cmd: list[str], port: int, threads: int, startup_timeout: float = 180.0,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Start `cmd` (in `env`, default this process's), wait until GET /v1/models answers, yield the
    base URL, then stop it."""
    with running_server_process(cmd, port, threads, startup_timeout, env) as (url, _):
        yield url


@contextmanager
def running_server_process(cmd: list[str], port: int, threads: int, startup_timeout: float = 180.0,
                           env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`running_server`, yielding the process too (for benchmarks that watch its RSS, threads, fds)."""
    env = dict(env if env is not None else os.environ, OMP_NUM_THREADS=str(threads))
    log = open(f"/tmp/kiln-bench-server-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {startup_timeout:.0f}s; see {log.name}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def run_rate(url: str, questions: list[str], rate: float, max_tokens: int, seed: int) -> dict[str, Any]:
    """Open-loop: request i is sent at its Poisson arrival time whether or not earlier ones finished."""
    results, elapsed = await run_load(url, "bench", questions, max_tokens, rate, None, seed=seed)
    summary = summarize(results, elapsed)
    return {
        "request_rate": rate,
        "num_requests": summary["num_requests"],
        "errors": summary["errors"],
        "first_error": summary["first_error"],
        "elapsed_s": elapsed,
        "output_tok_s": summary["output_tok_s"],
        "ttft_p50_s": summary["ttft_s"]["p50"],
        "ttft_p95_s": summary["ttft_s"]["p95"] if summary["ttft_s"]["p95"] is not None else float("inf"),
        "tpot_mean_s": summary["tpot_s"]["mean"],
        "itl_p95_s": summary["itl_s"]["p95"],
        "e2e_p95_s": summary["e2e_s"]["p95"],
    }


def requests_for_rate(pool: list[str], rate: float, duration_s: float, min_requests: int) -> list[str]:
    """Enough requests to keep arriving for `duration_s` at `rate`: a short burst would let a batching
    server admit everything at once and never show its steady-state queueing."""
    n = max(min_requests, round(rate * duration_s))
    if n > len(pool):
        raise ValueError(f"rate {rate} for {duration_s}s needs {n} prompts; only {len(pool)} available")
    return pool[:n]


def sweep(url: str, pool: list[str], rates: list[float], max_tokens: int, slo_s: float, duration_s: float,
          min_requests: int) -> dict[str, Any]:
    """Rates in ascending order; stop after the first rate that breaks the SLO (higher ones only queue more)."""
    asyncio.run(run_load(url, "bench", pool[:1], max_tokens, None, None))  # warm-up
    points = []
    sustained = 0.0
    for i, rate in enumerate(rates):
        questions = requests_for_rate(pool, rate, duration_s, min_requests)
        point = asyncio.run(run_rate(url, questions, rate, max_tokens, seed=1000 + i))
        point["meets_slo"] = point["errors"] == 0 and point["ttft_p95_s"] <= slo_s
        points.append(point)
        print(f"  rate {rate:5.2f} req/s: p95 TTFT {point['ttft_p95_s']:.3f}s, {point['output_tok_s']:.1f} tok/s, "
              f"{point['errors']} errors", file=sys.stderr, flush=True)
        if not point["meets_slo"]:
            break
        sustained = rate
    return {"points": points, "max_sustained_rate": sustained}


def run_serving_bench(model: str, gguf: Path, pool: list[str], rates: list[float], max_tokens: int, slo_s: float,
                      duration_s: float, min_requests: int, threads: int, dtype: str,
                      with_llama_cpp: bool) -> dict[str, Any]:
    systems: dict[str, dict[str, Any]] = {}
    port = free_port()
    print(f"kiln serve ({dtype})", file=sys.stderr)
    with running_server(kiln_server_cmd(model, port, dtype), port, threads) as url:
        systems[f"kiln serve ({dtype})"] = sweep(url, pool, rates, max_tokens, slo_s, duration_s, min_requests)
    if with_llama_cpp:
        port = free_port()
        print("llama-cpp-python server", file=sys.stderr)
        with running_server(llama_cpp_server_cmd(gguf, port, threads, n_ctx=4096), port, threads) as url:
            systems[f"llama-cpp-python server ({threads} threads)"] = sweep(url, pool, rates, max_tokens, slo_s, duration_s, min_requests)
    names = list(systems)
    ratio = None
    if len(names) == 2 and systems[names[1]]["max_sustained_rate"] > 0:
        ratio = systems[names[0]]["max_sustained_rate"] / systems[names[1]]["max_sustained_rate"]
    return {"slo": {"ttft_p95_s": slo_s}, "arrival_window_s": duration_s, "min_requests_per_rate": min_requests,
            "systems": systems, "kiln_over_peer_sustained_rate": ratio}
