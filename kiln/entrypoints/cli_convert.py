"""`kiln convert MODEL --to gguf --type f16|q8_0|q4_0|q4_1|q4_k_m|q5_k_m|q6_k -o FILE [--pure] [--force]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.convert.gguf_writer import GGUF_ARCHITECTURES, TYPES


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("convert", help="write a model as a GGUF file llama.cpp loads",
                       description="Write MODEL as a GGUF file llama.cpp loads: 2-D weights in --type, token "
                                   "embedding included (F16 where rows are not a multiple of 32; for q4 types the "
                                   "output head is Q8_0 unless --pure; q4_k_m/q5_k_m/q6_k: llama-quantize's mixed "
                                   "K-quant recipe), norms and biases F32, tokenizer copied from a GGUF or built "
                                   "from tokenizer.json.")
    p.add_argument("model", help="registered name (see `kiln pull --list`), .gguf file or Hugging Face folder "
                                 "(kiln-quantized folders are dequantized first)")
    p.add_argument("--to", default="gguf", choices=["gguf"], help="output format (gguf)")
    p.add_argument("--type", required=True, choices=list(TYPES), help="storage type of the 2-D weights")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    p.add_argument("--pure", action="store_true",
                   help="q4_0/q4_1: write the output head in that type too (default: Q8_0, like "
                        "llama-quantize's mixes); K-quant types: the base type (Q4_K/Q5_K/Q6_K) for every "
                        "matrix whose rows fit it, no Q6_K head / attn_v / ffn_down (llama-quantize --pure)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
    from kiln.convert.gguf_writer import check_output, convert_to_gguf
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model

    check_output(Path(args.output), args.force)  # before the (slow) load
    loaded = load_model(resolve_model(args.model), dtype="float32", quantized_weights="dequantize")
    out = convert_to_gguf(loaded, args.output, args.type, progress=True, force=args.force, pure=args.pure)
    print(f"kiln: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type}, "
          f"llama.cpp architecture {GGUF_ARCHITECTURES[loaded.config.architecture]})",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`kiln convert ...` on its own (for tests): 0 on success, 2 with a message on a user error."""
    from kiln.entrypoints.cli_common import run_subcommand

    return run_subcommand(register, argv)


if __name__ == "__main__":
    sys.exit(main())
