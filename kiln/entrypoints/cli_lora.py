"""`kiln lora merge BASE ADAPTER -o DIR [--quantize METHOD]`: a LoRA adapter folded into its base model."""

from __future__ import annotations

import argparse
import sys


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("lora", help="LoRA adapters: merge one into its base model (serving: kiln serve --lora)")
    which = p.add_subparsers(dest="lora_command", required=True, metavar="{merge}")
    m = which.add_parser("merge", help="fold a PEFT LoRA adapter into the base weights and save a model folder, "
                                       "optionally re-quantized; prints the KL of the result vs base+adapter")
    m.add_argument("base", help="the adapter's base model: registered name, .gguf file or Hugging Face folder")
    m.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("-o", "--output", required=True, help="output folder (must not exist or be empty)")
    m.add_argument("--quantize", default=None, choices=["rtn", "gptq", "awq", "smoothquant", "fp8"],
                   help="re-quantize the merged model with this `kiln quantize` method (default: save float16)")
    m.add_argument("--bits", type=int, default=4, help="with --quantize: 4 or 8 (smoothquant and fp8: 8)")
    m.add_argument("--group-size", type=int, default=128, help="with --quantize: 4-bit group size")
    m.add_argument("--calib-samples", type=int, default=64, help="with --quantize: calibration windows")
    m.add_argument("--kl-windows", type=int, default=4, help="WikiText-2 windows the KL is measured on")
    m.add_argument("--ctx", type=int, default=512, help="KL window length in tokens")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=cmd_lora)


def cmd_lora(args: argparse.Namespace) -> None:
    from kiln.lora.merge import merge_adapter
    from kiln.quantization.quantize import QuantizeOptions

    if args.kl_windows < 1:
        raise ValueError(f"--kl-windows must be at least 1, got {args.kl_windows}")
    opts = None
    if args.quantize is not None:
        opts = QuantizeOptions(method=args.quantize, bits=args.bits, group_size=args.group_size,
                               calib_samples=args.calib_samples, progress=not args.no_progress)
    report = merge_adapter(args.base, args.adapter, args.output, opts, args.kl_windows, args.ctx,
                           progress=not args.no_progress)
    print(report.describe(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from kiln.entrypoints.cli_common import run_subcommand

    return run_subcommand(register, argv)
