"""`kiln lora merge BASE ADAPTER -o DIR [--quantize METHOD]`: a LoRA adapter folded into its base model.

The base is loaded with its weights dequantized to fp32, the deltas added there (kiln.lora.merge), and
the result written as a Hugging Face safetensors folder (float16) that kiln and transformers load, or,
with --quantize, re-quantized by a `kiln quantize` method into kiln's quantized folder. The result's
distance from what it replaces, the base model serving the adapter (kiln.lora's batched path, fp32), is
measured as KL on a few WikiText-2 windows of the reloaded folder.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.quantization.quantize import QuantizeOptions


def register(sub: argparse._SubParsersAction) -> None:
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


@dataclass
class MergeReport:
    out: Path
    quantized: str | None  # e.g. "gptq int4 g128", None for a float folder
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    n_tokens: int

    def describe(self) -> str:
        what = f"re-quantized ({self.quantized})" if self.quantized else "float16"
        return (f"saved {self.out}: merged, {what}; KL vs base+adapter over {self.n_tokens} tokens: mean "
                f"{self.kl_mean:.5f}, p99 {self.kl_p99:.4f}, top-1 agreement {self.top1_agreement:.1%}")


def merge_adapter(base: str, adapter_path: str, out: str | Path, quantize: QuantizeOptions | None = None,
                  kl_windows: int = 4, ctx: int = 512, progress: bool = True) -> MergeReport:
    """Merge, quantize when `quantize` says how, save to `out` (a new or empty folder), reload it and
    measure its KL against the base model serving the adapter."""
    import torch

    from kiln.data import WIKITEXT2_TEST, data_path
    from kiln.eval.kl_divergence import kl_divergence
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model
    from kiln.lora.adapter import LoRAError, load_adapter
    from kiln.lora.manager import LoRAManager
    from kiln.lora.merge import merge_into
    from kiln.quantization.checkpoint import save_quantized

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoRAError(f"{out} exists and is not an empty folder; choose a new output folder")
    opts = quantize
    if opts is not None:
        opts.validate()  # before the model loads
    source = resolve_model(base)
    loaded = load_model(source, dtype=torch.float32, quantized_weights="dequantize")
    adapter = load_adapter("merge", adapter_path, loaded.model, max_rank=1 << 16, dtype=torch.float32)
    merge_into(loaded.model, adapter)
    quantization_config = None
    if opts is not None:
        from kiln.quantization.quantize import quantize_model

        quantization_config = quantize_model(loaded.model, loaded.tokenizer, opts).quantization_config
    save_quantized(out, loaded.model, loaded.config, loaded.tokenizer, quantization_config)
    del loaded
    # the reference: the base model serving the adapter through kiln's LoRA path, in fp32
    reference = load_model(source, dtype=torch.float32, quantized_weights="dequantize")
    manager = LoRAManager(reference.model, 1, adapter.rank)
    manager.add("adapter", adapter_path)
    merged = load_model(out, dtype=torch.float32)
    text = data_path(WIKITEXT2_TEST).read_bytes().decode("utf-8", errors="replace")
    with manager.applied("adapter"):
        kl = kl_divergence(merged.model, reference.model, reference.tokenizer, text, ctx, kl_windows, progress=progress)
    label = None
    if opts is not None:
        label = f"{opts.method} int{opts.bits}" + ("" if opts.bits == 8 else f" g{opts.group_size}")
    return MergeReport(out, label, kl.kl_mean, kl.kl_p99, kl.top1_agreement, kl.n_tokens_scored)


def main(argv: list[str] | None = None) -> int:
    from kiln.entrypoints.cli_common import run_subcommand

    return run_subcommand(register, argv)
