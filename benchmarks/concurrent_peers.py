"""Many streaming clients: `kiln serve` against the best `llama-server -np` configuration, at 32 and 64
concurrent clients, in one run.

Each client sends GSM8K chat questions (temperature 0, up to 128 new tokens), closed loop: 2 x C requests
at C in flight. Output tokens/s over the run (counted from each stream's usage chunk), TTFT p50/p95 and
errors. For each C: `kiln serve`, then `llama-server -np` C, C/2 and C/4 (continuous batching; the best
by output tok/s is the peer), then `kiln serve` again; kiln's figure is the mean of its two runs (the
machine's speed drifts over the minutes the peers take). Targets of issue 21: kiln ≥ 3x the best
llama-server at 32 and at 64, TTFT p95 ≤ 1 s at 32. 2 threads everywhere; the llama-server binary from
benchmarks/build_llama_cpp.py or `--llama-server`. On a shared CPU run it at `nice -n -20` with
autogroup scheduling off (see benchmarks/single_stream_peers.py). Writes
benchmarks/results/concurrent_peers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from build_llama_cpp import build_dir, build_flags, build_info, cpu_flags, existing  # noqa: E402
from single_stream_peers import machine  # noqa: E402

OUT = Path(__file__).parent / "results" / "concurrent_peers.json"
THREADS, DECODE_TOKENS, LEVELS = 2, 128, (32, 64)


def load(url: str, prompts: list[str], concurrency: int) -> dict[str, Any]:
    from kiln.bench.load_generator import run_load, summarize

    asyncio.run(run_load(url, "bench", prompts[:8], 16, None, 8))  # warm-up
    results, elapsed = asyncio.run(run_load(url, "bench", prompts, DECODE_TOKENS, None, concurrency))
    s = summarize(results, elapsed)
    return {"output_tok_s": s["output_tok_s"], "errors": s["errors"], "first_error": s["first_error"],
            "elapsed_s": elapsed, "requests": len(prompts), "ttft_p50_s": s["ttft_s"]["p50"],
            "ttft_p95_s": s["ttft_s"]["p95"], "tpot_p50_s": s["tpot_s"]["p50"]}


def kiln_cmd(model: str, port: int) -> list[str]:
    from kiln.bench.serving import kiln_server_cmd

    return kiln_server_cmd(model, port, "auto") + ["--threads", str(THREADS)]


def llama_cmd(binary: Path, gguf: Path, port: int, slots: int, concurrency: int) -> list[str]:
    # each slot gets n_ctx / slots tokens: 384 holds a GSM8K chat prompt plus 128 new tokens
    return [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-t", str(THREADS),
            "-tb", str(THREADS), "-np", str(slots), "-c", str(384 * slots), "-a", "bench", "--log-disable",
            "--threads-http", str(concurrency + 16)]  # one HTTP thread per streaming client


def main() -> None:
    import torch

    from kiln.bench.data import gsm8k_questions
    from kiln.bench.serving import free_port, running_server
    from kiln.hub import resolve_model
    from kiln.planner.calibration import read_bandwidth_gb_s

    torch.set_num_threads(THREADS)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--llama-server", type=Path, help="default: benchmarks/build_llama_cpp.py's build")
    parser.add_argument("--out", type=Path, default=OUT,
                        help="result file (default %(default)s; a second machine kind gets its own file, e.g. concurrent_peers_avx2.json)")
    args = parser.parse_args()
    server_bin = args.llama_server or (existing(build_dir(build_flags(cpu_flags())[0])) or {}).get("llama-server")
    if server_bin is None:
        sys.exit("no llama-server: run benchmarks/build_llama_cpp.py or pass --llama-server")
    gguf = resolve_model(args.model)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    result: dict[str, Any] = {"benchmark": "concurrent_peers", "model": args.model, "file": gguf.name,
                              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(read_bandwidth_gb_s()),
                              "decode_tokens": DECODE_TOKENS, "peer": build_info(server_bin), "levels": {}}
    t0 = time.time()
    for c in LEVELS:
        prompts = gsm8k_questions(2 * c)
        runs: dict[str, Any] = {}
        kiln_runs = []

        def kiln_run() -> None:
            port = free_port()
            with running_server(kiln_cmd(args.model, port), port, THREADS, env=env) as url:
                kiln_runs.append(load(url, prompts, c))
            print(f"{c} clients, kiln serve: {kiln_runs[-1]['output_tok_s']:.0f} tok/s", file=sys.stderr)

        kiln_run()
        for slots in (c, c // 2, c // 4):
            port = free_port()
            with running_server(llama_cmd(server_bin, gguf, port, slots, c), port, THREADS, env=env) as url:
                runs[f"llama-server -np {slots}"] = load(url, prompts, c)
            print(f"{c} clients, llama-server -np {slots}: {runs[f'llama-server -np {slots}']['output_tok_s']:.0f} tok/s",
                  file=sys.stderr)
        kiln_run()
        mean = {k: sum(r[k] for r in kiln_runs) / len(kiln_runs)
                for k in ("output_tok_s", "ttft_p50_s", "ttft_p95_s", "tpot_p50_s", "elapsed_s")}
        runs["kiln serve"] = {**kiln_runs[0], **mean, "errors": sum(r["errors"] for r in kiln_runs), "runs": kiln_runs}
        best = max((n for n in runs if n.startswith("llama-server")), key=lambda n: runs[n]["output_tok_s"])
        ratio = runs["kiln serve"]["output_tok_s"] / runs[best]["output_tok_s"]
        per_run = [r["output_tok_s"] / runs[best]["output_tok_s"] for r in kiln_runs]
        result["levels"][str(c)] = {"runs": runs, "best_peer": best, "ratio_vs_best_peer": ratio,
                                    "ratio_per_kiln_run": per_run, "target": 3.0,
                                    "verdict": "met" if min(per_run) >= 3 else "not met" if max(per_run) < 3
                                    else "not established",
                                    "ttft_p95_target_s": 1.0 if c == 32 else None}
    result["machine"].update(read_bandwidth_gb_s_end=read_bandwidth_gb_s(), load_average_end=os.getloadavg()[0])
    result["wall_s"] = time.time() - t0
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
