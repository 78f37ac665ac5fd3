"""`kiln bench throughput|latency|serving|serve`: kiln and its peers on the same prompts, in one run, as ratios."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from kiln.bench import kiln_runs, peers
from kiln.bench.data import gsm8k_questions, long_text
from kiln.bench.runner import run_isolated


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["throughput", "latency", "serving", "serve", "report"],
                   help="throughput: offline batch; latency: single stream; serving: kiln serve vs llama-cpp-python "
                        "server over a rate sweep; serve: load-generate against any OpenAI-compatible --base-url; "
                        "report: the benchmark report (benchmarks/results/*.json) as one HTML file, -o FILE")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=1024, help="latency: prompt length for the prefill figure")
    p.add_argument("--peers", default="transformers,llama_cpp", help="comma list of peers, or 'none'")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--bench-threads", type=int, default=2)
    p.add_argument("--request-rates", default="0.25,0.5,1,1.5,2,3,4,6",
                   help="serving: ascending request rates (req/s) to sweep")
    p.add_argument("--duration", type=float, default=45.0, help="serving: seconds of arrivals at each rate")
    p.add_argument("--slo-ttft", type=float, default=1.0, help="serving: p95 time-to-first-token SLO in seconds")
    g = p.add_argument_group("serve (load generator)")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="serve: the server to load")
    g.add_argument("--served-model", default=None, help="serve: model name sent in requests (default: --model)")
    g.add_argument("--dataset", default="gsm8k", help="serve: gsm8k, mtbench or a file with one prompt per line")
    g.add_argument("--request-rate", default=None,
                   help="serve: Poisson request rate(s) in req/s, comma-separated for a curve (default: all at once)")
    g.add_argument("--max-concurrency", type=int, default=None, help="serve: at most this many requests in flight")
    g.add_argument("--slo-ttft-ms", type=float, default=None, help="serve: TTFT SLO for goodput")
    g.add_argument("--slo-tpot-ms", type=float, default=None, help="serve: TPOT SLO for goodput")
    g.add_argument("--api-key", default=None, help="serve: sent as 'Authorization: Bearer KEY'")
    g.add_argument("--plot", default=None, help="serve: write latency CDFs (and a throughput/latency curve) as PNG")
    p.add_argument("--profile", action="store_true",
                   help="latency: also print where a decode step and a prefill chunk spend their time")
    p.add_argument("--no-dequantized-baseline", action="store_true",
                   help="skip the extra kiln run with GGUF weights dequantized to bfloat16")
    p.add_argument("-o", "--out", default=None, help="write results as JSON to this file (report: the HTML page)")


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the CLI was given (kiln.engine.arg_utils.EngineArgs), less model and dtype,
    which each benchmarked kiln system sets itself."""
    from kiln.engine.arg_utils import EngineArgs

    options = vars(EngineArgs.from_cli_args(args))
    del options["model"], options["dtype"]
    return options


# The dense baseline the quantized kernels are measured against: the same model in bf16 (half the
# weight bytes of fp32, so the harder baseline for a bandwidth-bound decode).
DEQUANTIZED_BASELINE_DTYPE = "bfloat16"


def _compare_dequantized(args: argparse.Namespace, path: Path) -> bool:
    """Also run kiln with GGUF weights expanded to bf16, so the quantized kernels' gain is a ratio."""
    return path.suffix == ".gguf" and args.quantized_weights != "dequantize" and not args.no_dequantized_baseline


def _prompts(args: argparse.Namespace):
    from kiln.hub import resolve_model
    from kiln.loader.gguf_loader import open_gguf  # noqa: F401 (fail early on a bad file)
    from kiln.loader.tokenizer import Tokenizer

    path = resolve_model(args.model)
    tok = Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_hf_dir(path)
    chats = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in gsm8k_questions(args.num_prompts)]
    return path, tok, [tok.encode(c, add_special_tokens=False) for c in chats]


def _run_serving(args: argparse.Namespace) -> dict[str, Any]:
    from kiln.bench.serving import run_serving_bench
    from kiln.hub import resolve_model

    path = resolve_model(args.model)
    wanted = [] if args.peers == "none" else [p.strip() for p in args.peers.split(",")]
    with_llama = "llama_cpp" in wanted and peers.llama_cpp_server_available() and path.suffix == ".gguf"
    rates = sorted(float(r) for r in args.request_rates.split(","))
    pool = gsm8k_questions(max(args.num_prompts, round(max(rates) * args.duration)))
    report = {"benchmark": "serving", "model": str(args.model),
              "output_len": args.output_len, "threads": args.bench_threads,
              "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M"),
              **run_serving_bench(str(args.model), path, pool, rates, args.output_len, args.slo_ttft, args.duration,
                                  args.num_prompts, args.bench_threads, args.dtype, with_llama),
              "missing_peers": [] if with_llama or "llama_cpp" not in wanted else ["llama_cpp (server extra)"]}
    return report


def _run_serve(args: argparse.Namespace) -> dict[str, Any]:
    from kiln.bench.load_generator import run_serve_bench

    rates: list[float | None] = [float(r) for r in args.request_rate.split(",")] if args.request_rate else [None]
    if any(r is not None and r <= 0 for r in rates):
        raise ValueError("--request-rate must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    return run_serve_bench(
        args.base_url, args.served_model or str(args.model), args.dataset, args.num_prompts, args.output_len, rates,
        args.max_concurrency, args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None,
        args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None, args.api_key, Path(args.plot) if args.plot else None)


def _write_report(args: argparse.Namespace) -> dict[str, Any]:
    """`kiln bench report -o report.html`: the README's tables and plots as one self-contained page."""
    from kiln.bench import report
    from kiln.bench.report_html import NOT_PRESENT, write_report

    if not report.results_present():
        print(NOT_PRESENT, file=sys.stderr)
    out = write_report(args.out or "report.html")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)", file=sys.stderr)
    return {"report": str(out)}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.kind == "report":
        return _write_report(args)
    if args.kind == "serve":
        return _write(args, _run_serve(args))
    if args.kind == "serving":
        return _write(args, _run_serving(args))
    path, tok, prompts = _prompts(args)
    wanted = [] if args.peers == "none" else [p.strip() for p in args.peers.split(",")]
    eos = sorted(tok.eos_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    threads = args.bench_threads
    results: list[dict[str, Any]] = []
    if args.kind == "throughput":
        results.append(run_isolated(kiln_runs.kiln_throughput, args.model, args.dtype, prompts, args.output_len,
                                    _engine_kwargs(args), threads=threads))
        if _compare_dequantized(args, path):
            results.append(run_isolated(kiln_runs.kiln_throughput, args.model, DEQUANTIZED_BASELINE_DTYPE, prompts,
                                        args.output_len,
                                        {**_engine_kwargs(args), "quantized_weights": "dequantize"}, threads=threads))
        if "transformers" in wanted and peers.transformers_available() and path.suffix == ".gguf":
            results.append(run_isolated(peers.transformers_generate_static, path, prompts, args.output_len,
                                        args.hf_batch_size, pad, threads=threads))
        if "llama_cpp" in wanted and peers.llama_cpp_available() and path.suffix == ".gguf":
            results.append(run_isolated(peers.llama_cpp_sequential, path, prompts, args.output_len, threads, eos,
                                        threads=threads))
        for r in results:
            if "elapsed_s" in r:
                r["requests_per_s"] = len(prompts) / r["elapsed_s"]
                r["output_tok_s"] = r["output_tokens"] / r["elapsed_s"]
                r["total_tok_s"] = (r["output_tokens"] + sum(map(len, prompts))) / r["elapsed_s"]
        key = "output_tok_s"
    else:
        prompt = prompts[0]
        long_prompt = tok.encode(long_text(20000), add_special_tokens=False)[: args.prefill_len]
        results.append(run_isolated(kiln_runs.kiln_latency, args.model, args.dtype, prompt, long_prompt,
                                    args.output_len, _engine_kwargs(args), args.profile, threads=threads))
        if args.profile and "profile" in results[0]:
            from kiln.bench.profile import format_profile

            print(format_profile(results[0]["profile"]), file=sys.stderr)
        if _compare_dequantized(args, path):
            results.append(run_isolated(kiln_runs.kiln_latency, args.model, DEQUANTIZED_BASELINE_DTYPE, prompt,
                                        long_prompt, args.output_len,
                                        {**_engine_kwargs(args), "quantized_weights": "dequantize"},
                                        threads=threads))
        if "transformers" in wanted and peers.transformers_available() and path.suffix == ".gguf":
            results.append(run_isolated(peers.transformers_latency, path, prompt, long_prompt, args.output_len,
                                        threads=threads))
        if "llama_cpp" in wanted and peers.llama_cpp_available() and path.suffix == ".gguf":
            results.append(run_isolated(peers.llama_cpp_latency, path, prompt, long_prompt, args.output_len, threads,
                                        eos, threads=threads))
        key = "decode_tok_s"
    base = results[0]
    ratios = {}
    for r in results[1:]:
        if key in r and key in base:
            ratios[r["system"]] = {k: base[k] / r[k] for k in (key, "prefill_tok_s") if k in r and k in base}
    report = {
        "benchmark": args.kind,
        "model": str(args.model),
        "num_prompts": len(prompts),
        "output_len": args.output_len,
        "threads": threads,
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "results": results,
        "kiln_over_peer": ratios,
        "missing_peers": [p for p in wanted if not any(p.split("_")[0] in r.get("system", "").replace(".", "_")
                                                         for r in results)],
    }
    return _write(args, report)


def _write(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report
