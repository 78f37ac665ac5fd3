"""`kiln` command line: pull, info, generate, chat, serve, bench, quantize, eval, convert.

User errors (KilnError, ValueError from validation) print one line and exit 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kiln.errors import KilnError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    from kiln.config import KV_CACHE_DTYPES

    p.add_argument("--model", default="smollm2-135m", help="registered name (see `kiln pull --list`) or a .gguf file / HF folder")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA and AMX CPUs, else fp32: faster on AVX-512 CPUs, see README), float32, bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache budget, e.g. 2GiB (default: 25%% of free RAM, at most 2 GiB)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache storage: auto (the model dtype; float16 under a float32 model on the CPU, as "
                        "llama.cpp), float32, bfloat16, float16 (16-bit under a float32 model), int8 or fp8_e4m3 "
                        "(1 byte per value + a scale per token and head: ~2x the tokens of 16-bit in the same "
                        "memory, small quality cost)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--speculative-model", default=None,
                   help="speculative decoding: ngram (prompt lookup), self:int4 / self:int8 (a quantized copy of "
                        "the model drafts), or a draft model name/path with the same tokenizer; off by default")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per step")
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=2,
                   help="do not speculate in a step with more running sequences than this (it stops paying)")
    p.add_argument("--no-speculative-adaptive", dest="speculative_adaptive", action="store_false",
                   help="speculate in every step up to the batch-size switch-off, even where it was measured not to pay")
    p.add_argument("--ngram-min", type=int, default=1, help="ngram proposer: shortest suffix to match")
    p.add_argument("--ngram-max", type=int, default=4, help="ngram proposer: longest suffix to match")
    p.add_argument("--quantized-weights", default="auto", choices=["auto", "native", "dequantize"],
                   help="GGUF Q4_0/Q4_1/Q8_0: run in blocks with native kernels (auto/native) or expand to --dtype")
    p.add_argument("--no-fused-decode-step", dest="fused_decode_step", action="store_false",
                   help="run decode steps op by op from Python instead of in one native call (for comparison)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def build_llm(args: argparse.Namespace):
    import torch

    from kiln.entrypoints.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        quantized_weights=args.quantized_weights,
        speculative_model=args.speculative_model,
        num_speculative_tokens=args.num_speculative_tokens,
        ngram_min=args.ngram_min,
        ngram_max=args.ngram_max,
        speculative_disable_by_batch_size=args.speculative_disable_by_batch_size,
        speculative_adaptive=args.speculative_adaptive,
        kv_cache_dtype=args.kv_cache_dtype,
        fused_decode_step=args.fused_decode_step,
    )
    print(llm.engine.kv_budget.describe(), file=sys.stderr)
    return llm


def sampling_from_args(args: argparse.Namespace):
    from kiln.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def cmd_pull(args: argparse.Namespace) -> None:
    from kiln.hub import REGISTRY, pull

    if args.list:
        for name, entry in REGISTRY.items():
            print(f"{name}\t{entry.description}")
        return
    print(pull(args.name, force=args.force))


def cmd_info(args: argparse.Namespace) -> None:
    from kiln.entrypoints.info import print_info

    print_info(args.model_path or args.model, args.dtype)


def cmd_generate(args: argparse.Namespace) -> None:
    llm = build_llm(args)
    params = sampling_from_args(args)
    prompt = args.prompt
    if args.chat_template:
        prompt = {"prompt_token_ids": llm.tokenizer.encode(
            llm.apply_chat_template([{"role": "user", "content": args.prompt}]), add_special_tokens=False)}
    for out in llm.generate_stream(prompt, params):
        print(out.outputs[0].delta_text, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    from kiln.entrypoints.chat import run_chat

    run_chat(build_llm(args), sampling_from_args(args), args.system)


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from kiln.engine.async_engine import AsyncEngine
    from kiln.entrypoints.openai.api_server import run_server

    llm = build_llm(args)  # prints the KV budget line
    engine = AsyncEngine(llm.engine, max_queue=args.max_queue or None)
    run_server(
        engine, args.served_model_name or args.model, args.host, args.port,
        api_key=args.api_key or os.environ.get("KILN_API_KEY") or None,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from kiln.bench.cli import run_bench

    run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: run, serve and measure LLMs on your own hardware")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="fetch a registered model into the cache (~/.cache/kiln or $KILN_HOME)")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.add_argument("--force", action="store_true")
    p.add_argument("--list", action="store_true", help="list registered models")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("info", help="architecture, parameters, tensor types and memory of a model")
    p.add_argument("model_path", nargs="?", default=None)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate a continuation of PROMPT (streamed)")
    p.add_argument("prompt")
    p.add_argument("--chat-template", action="store_true", help="wrap PROMPT as a user chat message")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/exit to quit, /reset to clear)")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, /metrics)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $KILN_API_KEY)")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting sequences before new requests get 503 (0: no limit)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks vs peers: throughput (batch), latency (single stream), serving (request-rate sweep)")
    from kiln.bench.cli import add_bench_args

    add_bench_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)

    from kiln.entrypoints import cli_convert, cli_eval, cli_quantize

    cli_quantize.register(sub)
    cli_eval.register(sub)
    cli_convert.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


def run_subcommand(register: Callable[[argparse._SubParsersAction], None], argv: list[str] | None) -> int:
    """One subcommand module's `register` on a parser of its own (its `main`, for tests), run like `kiln`."""
    parser = argparse.ArgumentParser(prog="kiln")
    register(parser.add_subparsers(dest="command", required=True))
    return run_parsed(parser.parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command: 0 on success, 2 with one line on a user error, 130 on Ctrl-C."""
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (KilnError, ValueError) as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
