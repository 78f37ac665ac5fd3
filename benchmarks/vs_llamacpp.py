"""kiln vs llama.cpp on this CPU, in one run: single-stream decode, 1,024-token prefill, 64 concurrent requests.

Same GGUF (the default SmolLM2-135M-Instruct Q4_1), same token ids, 2 threads everywhere, greedy.
- Decode: 128 new tokens after a ~40-token chat prompt (EOS ignored), tokens/s between the first and
  the last token. kiln with its fused decode step, kiln with it off
  (`--no-fused-decode-step`, the op-by-op path), llama.cpp through llama-cpp-python's `generate`
  (its C sampler, no Python logits processing). The systems alternate: 3 rounds, each a fresh
  process per system running 2 decodes and 2 prefills; the figure is the median of the 6.
- Prefill: one 1,024-token prompt (Tiny Shakespeare); kiln generates one token,
  llama.cpp evaluates the prompt (`Llama.eval`, n_batch 1024 / n_ubatch 512, its defaults' best here).
- 64 concurrent streaming chat requests (GSM8K questions, 128 tokens max, temperature 0, 128
  requests, closed loop at 64 in flight) against `kiln serve` and llama.cpp's own `llama-server`
  with 64, 32 and 16 parallel slots (continuous batching; the best is the peer); output tokens/s over
  the run, tokens counted from each stream's usage chunk. kiln serve runs before and after the
  llama-server runs and its figure is the mean of the two (the machine's speed drifts). llama-server
  is not built by this script: build it from the llama.cpp sources vendored in the llama-cpp-python
  sdist (cmake, target llama-server) outside the repository and pass `--llama-server PATH`.
- The profile of kiln's decode step and prefill chunk (`kiln bench latency --profile`'s breakdown).
Writes benchmarks/results/vs_llamacpp.json with the ratios kiln / llama.cpp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results" / "vs_llamacpp.json"
THREADS = 2
DECODE_TOKENS = 128
PREFILL_TOKENS = 1024
CONCURRENCY = 64
# single-stream runs alternate between the systems in ROUNDS rounds of REPEATS runs each (each
# system a fresh process per round): this machine drifts by 10-25 % over minutes, and a system
# measured only in one window would carry that drift into its ratio
ROUNDS = 3
REPEATS = 2
# llama-server configurations tried for the concurrent row; the best one is the peer
LLAMA_SERVER_SLOTS = (CONCURRENCY, CONCURRENCY // 2, CONCURRENCY // 4)


def chat_prompt(tokenizer: Any) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a robot who learns to paint, in five sentences."}])
    return tokenizer.encode(text, add_special_tokens=False)


def kiln_single_stream(model: str, prompt: list[int], long_prompt: list[int], fused: bool,
                       profile: bool) -> dict[str, Any]:
    from kiln import LLM, SamplingParams

    llm = LLM(model, enable_prefix_caching=False, max_num_batched_tokens=2048, fused_decode_step=fused)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    decode, prefill = [], []
    for _ in range(REPEATS):
        times = [time.perf_counter() for _ in llm.generate_stream(
            {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True))]
        decode.append((len(times) - 1) / (times[-1] - times[0]))
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": long_prompt}], SamplingParams(temperature=0, max_tokens=1))
        prefill.append(len(long_prompt) / (time.perf_counter() - start))
    result = {"decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
              "decode_runs": decode, "prefill_runs": prefill,
              "decode_path": llm.engine.loaded.model.decode_plan_status}
    if profile:
        from kiln.bench.profile import profile_engine

        result["profile"] = profile_engine(llm.engine, prompt, long_prompt)
    return result


def llama_cpp_single_stream(gguf: Path, prompt: list[int], long_prompt: list[int]) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=THREADS, n_threads_batch=THREADS, n_batch=1024,
                n_ubatch=512, verbose=False)
    for _ in zip(range(8), llm.generate(prompt, temp=0.0, top_k=1)):  # warm-up
        pass
    decode, prefill = [], []
    for _ in range(REPEATS):
        llm.reset()
        times = []
        for _tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) == DECODE_TOKENS:
                break
        decode.append((len(times) - 1) / (times[-1] - times[0]))
        llm.reset()
        start = time.perf_counter()
        llm.eval(long_prompt)
        prefill.append(len(long_prompt) / (time.perf_counter() - start))
    import llama_cpp

    return {"decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
            "decode_runs": decode, "prefill_runs": prefill, "version": llama_cpp.__version__}


def concurrent_output(url: str, prompts: list[str]) -> dict[str, Any]:
    from kiln.bench.load_generator import run_load, summarize

    asyncio.run(run_load(url, "bench", prompts[:8], 16, None, 8))  # warm-up
    results, elapsed = asyncio.run(run_load(url, "bench", prompts, DECODE_TOKENS, None, CONCURRENCY))
    s = summarize(results, elapsed)
    return {"output_tok_s": s["output_tok_s"], "errors": s["errors"], "first_error": s["first_error"],
            "retried_requests": s["retried_requests"],
            "elapsed_s": elapsed, "requests": len(prompts), "ttft_p50_s": s["ttft_s"]["p50"],
            "ttft_p95_s": s["ttft_s"]["p95"], "tpot_p50_s": s["tpot_s"]["p50"]}


def memory_read_gb_s() -> float:
    """This machine's read bandwidth right now (a 400 MB fp32 sum, 2 threads, best of 6): it bounds
    any single-stream decode, so the run records it next to the figures."""
    import torch

    x = torch.ones(100_000_000)
    best = 0.0
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's single-stream rounds: medians over every run of every round, the first round's
    other fields (decode path, profile); the first failed round's error if any failed."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    decode = [x for r in rounds for x in r["decode_runs"]]
    prefill = [x for r in rounds for x in r["prefill_runs"]]
    return {**rounds[0], "decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
            "decode_runs": decode, "prefill_runs": prefill,
            "peak_rss_mib": max(r.get("peak_rss_mib", 0.0) for r in rounds)}


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's repeated concurrent runs: output tok/s and latencies are the means over the runs,
    errors and retries their sums; each run is kept under "runs"."""
    mean = {key: sum(r[key] for r in runs) / len(runs)
            for key in ("output_tok_s", "elapsed_s", "ttft_p50_s", "ttft_p95_s", "tpot_p50_s")}
    return {**runs[0], **mean, "errors": sum(r["errors"] for r in runs),
            "retried_requests": sum(r["retried_requests"] for r in runs),
            "first_error": next((r["first_error"] for r in runs if r["first_error"]), None), "runs": runs}


def llama_server_cmd(binary: Path, gguf: Path, port: int, slots: int) -> list[str]:
    # each slot gets n_ctx / slots tokens: 384 holds a GSM8K chat prompt plus 128 new tokens
    return [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-t", str(THREADS),
            "-tb", str(THREADS), "-np", str(slots), "-c", str(384 * slots), "-a", "bench", "--log-disable",
            # one HTTP thread per streaming connection: its default (derived from the core count) would
            # hold most of the 64 clients in the accept queue
            "--threads-http", str(CONCURRENCY + 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="a llama-server binary built outside the repository (see the module docstring)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import torch

    from kiln.bench.data import gsm8k_questions, long_text
    from kiln.bench.runner import run_isolated
    from kiln.bench.serving import free_port, kiln_server_cmd, running_server
    from kiln.hub import resolve_model
    from kiln.loader.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    gguf = Path(resolve_model(args.model))
    tok = Tokenizer.from_gguf(gguf)
    prompt = chat_prompt(tok)
    long_prompt = tok.encode(long_text(20000), add_special_tokens=False)[:PREFILL_TOKENS]
    report: dict[str, Any] = {
        "benchmark": "vs_llamacpp", "model": args.model, "threads": THREADS, "machine":
        f"{platform.machine()}, {__import__('os').cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
        "prompt_tokens": len(prompt), "decode_tokens": DECODE_TOKENS, "prefill_tokens": len(long_prompt),
        "repeats": REPEATS, "rounds": ROUNDS,
    }
    report["memory_read_gb_s"] = {"start": memory_read_gb_s()}
    # each system in its own process: no allocator or thread-pool state carries over
    rounds: dict[str, list[dict[str, Any]]] = {"kiln": [], "kiln_unfused": [], "llama_cpp": []}
    for r in range(ROUNDS):
        print(f"single stream, round {r + 1}/{ROUNDS}: kiln (fused), kiln (op-by-op), llama.cpp", file=sys.stderr)
        rounds["kiln"].append(run_isolated(kiln_single_stream, args.model, prompt, long_prompt, True, r == 0,
                                           threads=THREADS))
        rounds["kiln_unfused"].append(run_isolated(kiln_single_stream, args.model, prompt, long_prompt, False, False,
                                                   threads=THREADS))
        rounds["llama_cpp"].append(run_isolated(llama_cpp_single_stream, gguf, prompt, long_prompt, threads=THREADS))
    for name, results in rounds.items():
        report[name] = merge_rounds(results)

    questions = gsm8k_questions(2 * CONCURRENCY)
    concurrent: dict[str, Any] = {}
    kiln_runs: list[dict[str, Any]] = []

    def kiln_serve_run() -> None:
        port = free_port()
        print(f"{CONCURRENCY} concurrent: kiln serve (run {len(kiln_runs) + 1})", file=sys.stderr)
        with running_server(kiln_server_cmd(args.model, port, "auto"), port, THREADS) as url:
            kiln_runs.append(concurrent_output(url, questions))

    kiln_serve_run()
    if args.llama_server is not None:
        for slots in LLAMA_SERVER_SLOTS:
            port = free_port()
            print(f"{CONCURRENCY} concurrent: llama-server -np {slots}", file=sys.stderr)
            with running_server(llama_server_cmd(args.llama_server, gguf, port, slots), port, THREADS) as url:
                concurrent[f"llama-server -np {slots}"] = concurrent_output(url, questions)
        # kiln again after the peers: this machine's speed drifts by 10-25 % over the minutes the peers
        # take, so kiln's figure is the mean of a run before and a run after them
        kiln_serve_run()
    concurrent["kiln serve"] = combine_runs(kiln_runs)
    report["memory_read_gb_s"]["end"] = memory_read_gb_s()
    report["concurrent"] = concurrent
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")  # kept even if a system failed below
    failed = {n: r["error"] for n, r in (("kiln", report["kiln"]), ("kiln_unfused", report["kiln_unfused"]),
                                         ("llama_cpp", report["llama_cpp"])) if "error" in r}
    if failed:
        raise SystemExit(f"single-stream runs failed: {failed}")

    k, lc = report["kiln"], report["llama_cpp"]
    # the best llama-server configuration by output tokens/s (a run with dropped requests counts only
    # the tokens its completed requests produced; the errors are reported next to it)
    peers = {n: r["output_tok_s"] for n, r in concurrent.items() if n.startswith("llama-server")}
    best_peer = max(peers, key=peers.get) if peers else None
    report["ratios"] = {
        "decode_kiln_over_llama_cpp": k["decode_tok_s"] / lc["decode_tok_s"],
        "prefill_kiln_over_llama_cpp": k["prefill_tok_s"] / lc["prefill_tok_s"],
        "decode_fused_over_unfused": k["decode_tok_s"] / report["kiln_unfused"]["decode_tok_s"],
        "concurrent_kiln_over_best_llama_server":
            concurrent["kiln serve"]["output_tok_s"] / peers[best_peer] if best_peer else None,
        "best_llama_server": best_peer,
    }
    report["targets"] = {"decode": 1.5, "prefill": 3.0, "concurrent": 3.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
