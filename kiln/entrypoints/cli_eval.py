"""`kiln eval ppl MODEL` and `kiln eval kl MODEL --reference REF`: the quality gate from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.errors import KilnError

DEFAULT_TEXT = "wikitext-2-raw/wiki.test.raw"


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("eval", help="quality: perplexity (llama.cpp chunking) or KL divergence against a reference model")
    which = p.add_subparsers(dest="eval_command", required=True, metavar="ppl|kl")
    for name, help_text in (("ppl", "perplexity on WikiText-2 test (or --text), llama.cpp's chunking"),
                            ("kl", "KL(reference || model), top-1 agreement and mean |dp| on the same windows")):
        q = which.add_parser(name, help=help_text)
        q.add_argument("model", help="registered name, .gguf file or folder")
        if name == "kl":
            q.add_argument("--reference", required=True, help="the reference model (e.g. the full-precision original)")
        q.add_argument("--ctx", type=int, default=512, help="window length in tokens (the second half is scored)")
        q.add_argument("--chunks", type=int, default=None, help="score only the first N windows (default: all)")
        q.add_argument("--text", default=None, help=f"plain-text file (default: ../shared/data/{DEFAULT_TEXT})")
        q.add_argument("--dtype", default="float32", help="activation dtype (float32 is what llama.cpp's figures compare with)")
        q.add_argument("--quantized-weights", default="dequantize", choices=["auto", "native", "dequantize"],
                       help="GGUF Q4/Q8 blocks: native kernels or dequantized (the reference numbers)")
        q.set_defaults(func=cmd_eval)


def read_text(path: str | None) -> str:
    if path is None:
        from kiln.bench.data import data_dir

        file = data_dir() / DEFAULT_TEXT
    else:
        file = Path(path)
    if not file.is_file():
        raise KilnError(f"text file {file} not found; pass --text with a plain-text file")
    return file.read_text(encoding="utf-8", errors="replace")


def cmd_eval(args: argparse.Namespace) -> None:
    from kiln.eval.perplexity import kl_divergence, perplexity
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model

    text = read_text(args.text)
    loaded = load_model(resolve_model(args.model), dtype=args.dtype, quantized_weights=args.quantized_weights)
    if args.eval_command == "ppl":
        print(perplexity(loaded.model, loaded.tokenizer, text, args.ctx, args.chunks, progress=True).describe())
        return
    reference = load_model(resolve_model(args.reference), dtype=args.dtype, quantized_weights=args.quantized_weights)
    if reference.tokenizer.backend.get_vocab(with_added_tokens=True) != loaded.tokenizer.backend.get_vocab(with_added_tokens=True):
        raise KilnError(f"{args.model} and {args.reference} use different tokenizers; KL needs the same vocabulary")
    print(kl_divergence(loaded.model, reference.model, loaded.tokenizer, text, args.ctx, args.chunks, progress=True).describe())
