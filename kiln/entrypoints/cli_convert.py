"""`kiln convert MODEL --to gguf --type f16|q8_0|q4_0|q4_1 -o FILE`."""

from __future__ import annotations

import argparse
import sys

from kiln.convert.gguf_writer import TYPES


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("convert", help="write a model as a GGUF file llama.cpp loads")
    p.add_argument("model", help="registered name, .gguf file or folder (kiln-quantized folders are dequantized first)")
    p.add_argument("--to", default="gguf", choices=["gguf"])
    p.add_argument("--type", required=True, choices=list(TYPES), help="storage type of the 2-D weights")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from kiln.convert.gguf_writer import convert_to_gguf
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model

    loaded = load_model(resolve_model(args.model), dtype=torch.float32, quantized_weights="dequantize")
    try:
        out = convert_to_gguf(loaded, args.output, args.type, force=args.force)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})", file=sys.stderr)
