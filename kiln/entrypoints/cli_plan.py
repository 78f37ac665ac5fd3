"""`kiln plan MODEL ...` (memory and speed before you run) and `kiln advise MODEL ...` (measure, decide, verify)."""

from __future__ import annotations

import argparse
import json
import sys

WEIGHT_CHOICES = ("file", "fp32", "fp16", "bf16", "int8", "fp8", "int4", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k_m",
                  "q5_k_m", "q6_k")
KV_CHOICES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8_e4m3")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory budget (weights, KV cache, activations, per rank) and predicted speed of a "
                                    "model before you run it; --calibrate measures this machine")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="preset (llama-3-8b, llama-3-70b, mistral-7b, qwen2-7b, gemma-3-270m, gemma-3-27b, llama-2-7b), "
                        "registered name, .gguf file, Hugging Face folder or a config.json")
    p.add_argument("--weights", default="file", choices=WEIGHT_CHOICES,
                   help="weight storage (default: the file's own types; bf16 for a config.json)")
    p.add_argument("--kv-dtype", default="auto", choices=KV_CHOICES, help="KV cache storage (auto: as kiln stores it)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="activation dtype (auto: bf16 on CUDA, fp32 on a CPU)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the model's maximum)")
    p.add_argument("--concurrency", type=int, default=1, help="sequences held at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="the scheduler's per-step token budget")
    p.add_argument("--draft", default=None, help="speculative draft: ngram, self:int4, self:int8 or a model")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--memory", default=None, help="memory per device, e.g. 24GiB (default: what this machine has free)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quantized-weights", default="auto", choices=("auto", "native"),
                   help="as the engine option: auto keeps dense copies of block-quantized layers on the CPU")
    p.add_argument("--max-weight-memory", default=None,
                   help="as the engine option: weights kept in RAM at most (e.g. 40MiB); later layers stream from disk")
    p.add_argument("--calibrate", action="store_true", help="measure this machine first (about a minute; cached)")
    p.add_argument("--threads", type=int, default=2, help="threads the calibration and predictions assume")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_plan)
    from kiln.entrypoints import cli_advise

    cli_advise.register(sub)


def cmd_plan(args: argparse.Namespace) -> None:
    from kiln.engine.kv_budget import parse_memory
    from kiln.planner import render
    from kiln.planner.memory import PlanRequest
    from kiln.planner.plan_cmd import run_plan

    calibration = None
    if args.calibrate:
        from kiln.planner.calibration import calibrate

        calibration = calibrate(args.threads, log=lambda s: print(f"calibrating: {s}", file=sys.stderr))
    elif args.device == "cpu":
        from kiln.planner.calibration import load_calibration

        calibration = load_calibration(args.threads)
    req = PlanRequest(weights=args.weights, kv_cache_dtype=args.kv_dtype, activation_dtype=args.dtype,
                      context=args.context, concurrency=args.concurrency,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      tensor_parallel_size=args.tensor_parallel_size, device=args.device,
                      quantized_weights=args.quantized_weights,
                      max_weight_memory=parse_memory(args.max_weight_memory, "--max-weight-memory"))
    result = run_plan(args.model, req, parse_memory(args.memory), args.draft, calibration)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    print(render.plan_table(result.plan, result.memory, result.fits))
    if result.fits is False:
        print(render.fixes_table(result.fixes))
    if result.prediction is not None:
        print(render.predictions_table(result.prediction))
    elif args.device == "cpu":
        print("speed: run `kiln plan --calibrate` once on this machine for tok/s predictions", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from kiln.entrypoints.cli_common import run_subcommand

    return run_subcommand(register, argv)
