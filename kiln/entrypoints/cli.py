"""`kiln` command line: pull, info, generate, chat, serve, bench, quantize, eval, convert.

User errors (KilnError, ValueError from validation) print one line and exit 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from kiln.entrypoints.cli_common import run_parsed


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags, all declared in kiln.engine.arg_utils.EngineArgs."""
    from kiln.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(p)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def build_llm(args: argparse.Namespace):
    """The offline LLM for `generate`/`chat`, loaded and driven on this (the main) thread."""
    from kiln.engine.arg_utils import EngineArgs
    from kiln.entrypoints.llm import LLM

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**vars(engine_args))
    print_startup(llm.engine)
    return llm


def print_startup(engine) -> None:
    """The start-up lines: the KV budget, and on the CPU which kernels run (native or plain torch, and why)."""
    print(engine.kv_budget.describe(), file=sys.stderr)
    if engine.loaded.model.device.type == "cpu":
        from kiln.kernels.native import native_status

        print(f"kernels: {native_status()}", file=sys.stderr)
    from kiln.entrypoints.info import weight_memory_line

    print(f"weights: {weight_memory_line(engine.loaded)}", file=sys.stderr)


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

    print_info(args.model_path or args.model, args.dtype, args.max_weight_memory)


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

    from kiln.engine.arg_utils import EngineArgs
    from kiln.engine.async_engine import AsyncEngine
    from kiln.entrypoints.openai.api_server import run_server

    from kiln.entrypoints.openai.limits import ServerLimits

    limits = ServerLimits(max_n=args.max_n, max_stop_strings=args.max_stop_strings,
                          max_request_tokens=args.max_request_tokens, max_body_bytes=args.max_body_bytes,
                          max_streams_per_key=args.max_streams_per_key)  # checked before the model loads
    # The engine thread loads the model and runs every step; this (main) thread only serves HTTP and
    # never enters a torch parallel region (AsyncEngine's threading contract, kiln issue 25).
    engine_args = EngineArgs.from_config_file(args.config, args) if args.config else EngineArgs.from_cli_args(args)
    api_key = args.api_key or os.environ.get("KILN_API_KEY") or None
    from kiln.entrypoints.replicas.options import wants_replicas

    if wants_replicas(args):  # N engines on Ray Serve behind this same app (kiln/entrypoints/replicas)
        from kiln.entrypoints.replicas.launch import serve_replicas

        serve_replicas(args, engine_args, limits, api_key)
        return
    engine = AsyncEngine.from_engine_args(engine_args, max_queue=args.max_queue or None)
    print_startup(engine.engine)
    if not args.no_ui:
        print(f"web UI: http://{args.host}:{args.port}/ (chat), /dashboard, /report (--no-ui turns them off)", file=sys.stderr)
    run_server(
        engine, args.served_model_name or engine_args.model, args.host, args.port,
        api_key=api_key,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level, limits=limits, ui=not args.no_ui,
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
    p.add_argument("--max-weight-memory", default=None,
                   help="show what this weight budget keeps resident and what it streams from disk (e.g. 40MiB)")
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
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help="engine options from a JSON object of option names (what `kiln advise --apply` writes); "
                        "flags given here win over the file")
    p.add_argument("--max-n", type=int, default=16, help="most choices (n) one request may ask for")
    p.add_argument("--max-stop-strings", type=int, default=16, help="most stop strings one request may give")
    p.add_argument("--max-request-tokens", type=int, default=0,
                   help="most tokens one request may cost, prompt + n x max_tokens (0: only the context limits it)")
    p.add_argument("--max-body-bytes", type=int, default=2 << 20, help="largest request body accepted (413 above)")
    p.add_argument("--max-streams-per-key", type=int, default=0,
                   help="streaming responses one API key may hold open at once (429 above; 0: no limit)")
    p.add_argument("--no-ui", action="store_true",
                   help="no browser pages (chat at /, /dashboard, /report); the API is unchanged")
    from kiln.entrypoints.replicas.options import add_replica_args

    add_replica_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks vs peers: throughput (batch), latency (single stream), serving (request-rate sweep)")
    from kiln.bench.cli import add_bench_args

    add_bench_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)

    from kiln.entrypoints import cli_cache, cli_convert, cli_eval, cli_quantize, cli_tune

    cli_quantize.register(sub)
    from kiln.entrypoints import cli_plan

    cli_plan.register(sub)
    cli_eval.register(sub)
    cli_convert.register(sub)
    cli_cache.register(sub)
    cli_tune.register(sub)
    from kiln.entrypoints import cli_lora

    cli_lora.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
