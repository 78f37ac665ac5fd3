"""`kiln serve` for one user against `LLM.generate` and llama.cpp's `llama-server -np 1`, in one run.

kiln issue 25: `kiln serve` decoded a single stream at about half the speed of `LLM.generate`,
because it loaded the model on the main thread and ran the engine on a second one (two OpenMP
teams on two cores). This script measures, on the default model (GGUF Q4_1), 2 threads everywhere:

- single-stream decode: one greedy chat request, 128 new tokens (EOS ignored), decode tok/s between
  the first and the last streamed token. Systems: `LLM.generate_stream` in a fresh process (the
  offline path, main thread); `kiln serve` through HTTP streaming (this checkout); optionally
  `kiln serve` of an older checkout (`--before-src DIR`, e.g. a `git worktree` of the commit before
  the fix) and `llama-server -np 1` (`--llama-server PATH`, built outside the repository from the
  llama.cpp sources vendored in the llama-cpp-python sdist). Every server gets the same HTTP client
  and request. Systems alternate in ROUNDS rounds, each a fresh process; the figure is the median of
  REPEATS streams per round over all rounds.
- 64 concurrent streaming clients (GSM8K chat prompts, 128 tokens, 128 requests) against this
  checkout's `kiln serve` and, with `--before-src`, the older one: output tok/s (not worse is the
  target).

Writes benchmarks/results/serve_single_stream.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

OUT = Path(__file__).parent / "results" / "serve_single_stream.json"
THREADS = 2
DECODE_TOKENS = 128
ROUNDS = 3
REPEATS = 2
CONCURRENCY = 64
PROMPT = "Write a short story about a robot who learns to paint, in five sentences."


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def offline_decode(model: str) -> dict[str, Any]:
    """LLM.generate_stream on this process's main thread (run in a fresh process)."""
    from kiln import LLM, SamplingParams

    llm = LLM(model, enable_prefix_caching=False, threads=THREADS)
    prompt = llm._chat_prompt([{"role": "user", "content": PROMPT}])
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    runs = []
    for _ in range(REPEATS):
        stamps = [time.perf_counter() for out in llm.generate_stream(prompt, params) if out.outputs[0].delta_token_ids]
        runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"decode_runs": runs}


def stream_decode(url: str) -> float:
    """One streamed chat completion of DECODE_TOKENS tokens: decode tok/s between first and last token."""
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": DECODE_TOKENS,
            "temperature": 0.0, "stream": True, "ignore_eos": True}
    stamps: list[float] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    if len(stamps) < DECODE_TOKENS // 2:
        raise RuntimeError(f"only {len(stamps)} streamed chunks for {DECODE_TOKENS} tokens")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def server_decode(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    from kiln.bench.serving import running_server

    port = int(cmd[cmd.index("--port") + 1])
    with running_server(cmd, port, THREADS, env=env) as url:
        stream_decode(url)  # warm-up
        return {"decode_runs": [stream_decode(url) for _ in range(REPEATS)]}


def concurrent_output(cmd: list[str], env: dict[str, str], prompts: list[str]) -> dict[str, Any]:
    from kiln.bench.load_generator import run_load, summarize
    from kiln.bench.serving import running_server

    port = int(cmd[cmd.index("--port") + 1])
    with running_server(cmd, port, THREADS, env=env) as url:
        asyncio.run(run_load(url, "bench", prompts[:8], 16, None, 8))  # warm-up
        results, elapsed = asyncio.run(run_load(url, "bench", prompts, DECODE_TOKENS, None, CONCURRENCY))
    s = summarize(results, elapsed)
    return {"output_tok_s": s["output_tok_s"], "errors": s["errors"], "ttft_p50_s": s["ttft_s"]["p50"],
            "ttft_p95_s": s["ttft_s"]["p95"], "tpot_p50_s": s["tpot_s"]["p50"]}


def kiln_serve_cmd(model: str, src: Path | None) -> tuple[list[str], dict[str, str]]:
    from kiln.bench.serving import free_port, kiln_server_cmd

    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    cmd = kiln_server_cmd(model, free_port(), "auto") + ["--threads", str(THREADS)]
    if src is not None:
        # an older checkout's kiln instead of the installed one: the editable install's import hook
        # sits on sys.meta_path ahead of PYTHONPATH, so drop it before importing kiln
        boot = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
                f"getattr(f, '__module__', '')]; sys.path.insert(0, {str(src)!r}); "
                "from kiln.entrypoints.cli import main; sys.exit(main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", boot, *cmd[cmd.index("serve"):]]
    return cmd, env


def llama_server(binary: Path, gguf: Path) -> tuple[list[str], dict[str, str]]:
    from kiln.bench.serving import free_port

    return ([str(binary), "-m", str(gguf), "--port", str(free_port()), "--host", "127.0.0.1", "-t", str(THREADS),
             "-tb", str(THREADS), "-np", "1", "-c", "4096", "-a", "bench", "--log-disable"],
            dict(os.environ, OMP_NUM_THREADS=str(THREADS)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--before-src", type=Path, default=None, help="an older kiln checkout to compare with")
    parser.add_argument("--before-label", default="before", help="what --before-src is (e.g. a commit)")
    parser.add_argument("--llama-server", type=Path, default=None, help="a llama-server binary")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from kiln.bench.data import gsm8k_questions
    from kiln.bench.runner import run_isolated
    from kiln.hub import resolve_model

    gguf = Path(resolve_model(args.model))
    systems: dict[str, Callable[[], dict[str, Any]]] = {
        "LLM.generate (offline, main thread)": lambda: run_isolated(offline_decode, args.model, threads=THREADS),
        "kiln serve": lambda: server_decode(*kiln_serve_cmd(args.model, None)),
    }
    if args.before_src is not None:
        systems[f"kiln serve ({args.before_label})"] = lambda: server_decode(*kiln_serve_cmd(args.model,
                                                                                             args.before_src))
    if args.llama_server is not None:
        systems["llama-server -np 1"] = lambda: server_decode(*llama_server(args.llama_server, gguf))
    runs: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(ROUNDS):
        for name, run in systems.items():
            print(f"single stream, round {r + 1}/{ROUNDS}: {name}", file=sys.stderr)
            result = run()
            if "error" in result:
                raise SystemExit(f"{name} failed: {result['error']}")
            runs[name].extend(result["decode_runs"])
    single = {name: {"decode_tok_s": statistics.median(v), "runs": v} for name, v in runs.items()}

    questions = gsm8k_questions(2 * CONCURRENCY)
    concurrent = {"kiln serve": concurrent_output(*kiln_serve_cmd(args.model, None), questions)}
    if args.before_src is not None:
        concurrent[f"kiln serve ({args.before_label})"] = concurrent_output(
            *kiln_serve_cmd(args.model, args.before_src), questions)

    base = single["kiln serve"]["decode_tok_s"]
    report = {
        "benchmark": "serve_single_stream", "model": args.model, "threads": THREADS, "machine":
        f"{cpu_name()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
        "decode_tokens": DECODE_TOKENS, "rounds": ROUNDS, "repeats": REPEATS,
        "single_stream": single, "concurrent_64": concurrent,
        "ratios": {f"kiln serve / {name}": base / r["decode_tok_s"] for name, r in single.items() if name != "kiln serve"},
        "targets": {"kiln serve / LLM.generate (offline, main thread)": "within 10 % (>= 0.9)"},
    }
    if args.before_src is not None:
        report["ratios"]["concurrent kiln serve / before"] = (
            concurrent["kiln serve"]["output_tok_s"] / concurrent[f"kiln serve ({args.before_label})"]["output_tok_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
