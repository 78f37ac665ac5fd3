"""`kiln eval ppl MODEL` and `kiln eval kl MODEL --reference REF`: the quality gate from the command line.

Handlers raise KilnError / ValueError for bad input; `kiln.entrypoints.cli.main` (and `main` here,
for tests and scripts) prints them as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.data import WIKITEXT2_TEST, data_path
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.loader.model_loader import LoadedModel


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `eval ppl` and `eval kl` to a `kiln` subparsers object."""
    p = sub.add_parser("eval", help="quality: perplexity (llama.cpp's chunking) or KL divergence from a reference model")
    which = p.add_subparsers(dest="eval_command", required=True, metavar="{ppl,kl}")
    ppl = which.add_parser("ppl", help="perplexity on WikiText-2 test (or --text) with llama.cpp's chunking")
    kl = which.add_parser("kl", help="KL(reference || model), top-1 agreement and mean |dp| on the same windows")
    for q in (ppl, kl):
        q.add_argument("model", help="registered name (see `kiln pull --list`), .gguf file or Hugging Face folder")
        if q is kl:
            q.add_argument("--reference", required=True, help="the reference model, e.g. the full-precision original")
            q.add_argument("--reference-dtype", default="float32",
                           help="dtype of the reference (always run with its weights dequantized); default float32")
        q.add_argument("--ctx", type=int, default=512, help="window length in tokens; the second half is scored (default 512)")
        q.add_argument("--chunks", type=int, default=None, help="score only the first N windows (default: all)")
        q.add_argument("--text", default=None, help="plain-text file to evaluate on (default: WikiText-2 test, shipped with kiln)")
        q.add_argument("--dtype", default="float32", help="activation dtype (float32 is what llama.cpp's figures compare with)")
        q.add_argument("--quantized-weights", default="dequantize", choices=["dequantize", "auto", "native"],
                       help="GGUF Q4/Q8 blocks: dequantized to --dtype (the reference numbers) or run by kiln's kernels")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(func=cmd_eval)


def read_text(path: str | None) -> str:
    """The evaluation text, decoded as bytes → UTF-8 with newlines untouched (llama.cpp reads the bytes).

    Default: WikiText-2 test as shipped in kiln.data, the text llama.cpp's published PPL figures use."""
    file = data_path(WIKITEXT2_TEST) if path is None else Path(path).expanduser()
    if not file.is_file():
        raise KilnError(f"text file {file} not found (check the path); pass --text with a plain-text file")
    return file.read_bytes().decode("utf-8", errors="replace")


def _load(name: str, dtype: str, quantized_weights: str) -> "LoadedModel":
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model

    return load_model(resolve_model(name), dtype=dtype, quantized_weights=quantized_weights)


def cmd_eval(args: argparse.Namespace) -> None:
    """Run `kiln eval ppl|kl` and print the result (one line per figure group)."""
    from kiln.eval.kl_divergence import kl_divergence
    from kiln.eval.perplexity import perplexity

    if args.chunks is not None and args.chunks < 1:
        raise ValueError(f"--chunks must be at least 1, got {args.chunks}")
    text = read_text(args.text)  # before loading: a typo in --text should not cost a model load
    loaded = _load(args.model, args.dtype, args.quantized_weights)
    progress = not args.no_progress
    if args.eval_command == "ppl":
        print(perplexity(loaded.model, loaded.tokenizer, text, args.ctx, args.chunks, progress=progress).describe())
        return
    reference = _load(args.reference, args.reference_dtype, "dequantize")
    vocab = loaded.tokenizer.backend.get_vocab(with_added_tokens=True)
    if reference.tokenizer.backend.get_vocab(with_added_tokens=True) != vocab:
        raise KilnError(f"{args.model} and {args.reference} use different tokenizers; KL needs the same vocabulary")
    print(kl_divergence(loaded.model, reference.model, loaded.tokenizer, text, args.ctx, args.chunks, progress=progress).describe())


def main(argv: list[str] | None = None) -> int:
    """`kiln eval ...` without the rest of the CLI: argv starts with "eval". Returns the exit status."""
    from kiln.entrypoints.cli_common import run_subcommand

    return run_subcommand(register, argv)


if __name__ == "__main__":
    sys.exit(main())
