"""`kiln quantize MODEL --method M --bits B [--group-size G] [--format F] -o DIR`: quantize, check, save.

`--format kiln` (default) writes kiln's own folder; `gptq` (GPTQModel's gptq_v2 layout),
`awq` (AutoAWQ GEMM) and `compressed-tensors` (pack-quantized) write the same weights in the layouts
other engines load (kiln.quantization.foreign.export); those hold one INT scheme for every layer,
without AWQ's run-time smoothing (use --method rtn or gptq)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.errors import KilnError


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear layers (RTN, GPTQ, AWQ, SmoothQuant, FP8) and save a folder")
    p.add_argument("model", help="registered name, .gguf file or Hugging Face folder (the full-precision source)")
    p.add_argument("--method", required=True, choices=["rtn", "gptq", "awq", "smoothquant", "fp8"])
    p.add_argument("--bits", type=int, default=4, help="4 or 8 (smoothquant and fp8: 8)")
    p.add_argument("--group-size", type=int, default=128, help="4-bit group size: 32, 64, 128, 256, or -1 per channel")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric codes (default: symmetric at 8 bits, zero points at 4)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, a fraction of the median Hessian diagonal")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in order, not by activation size")
    p.add_argument("--sequential", action="store_true",
                   help="GPTQ/AWQ: calibrate each layer on the already-quantized earlier layers' outputs (slower, better)")
    p.add_argument("--first-token-weight", type=float, default=1.0,
                   help="GPTQ: count the first position (the attention sink) this many times in the Hessian")
    p.add_argument("--clip", action="store_true", help="AWQ: also search a clip ratio per group (the paper's second step)")
    p.add_argument("--format", default="kiln", choices=["kiln", "gptq", "awq", "compressed-tensors"],
                   help="folder layout to write (default kiln)")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--calib-file", default=None, help="calibration text (default: Pride and Prejudice, shipped with kiln)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--target-bits", type=float, default=None,
                   help="mixed precision: promote the most sensitive layers to 8 bits up to this mean bit width")
    p.add_argument("--max-kl", type=float, default=None,
                   help="refuse to save when the mean KL vs the original (held-out text) exceeds this")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist or be empty)")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model
    from kiln.quantization.checkpoint import save_quantized
    from kiln.quantization.quantize import QuantizeOptions, quantize_model

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KilnError(f"{out} exists and is not an empty folder; choose a new output folder")
    opts = QuantizeOptions(
        method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym, damp=args.damp,
        act_order=not args.no_act_order, alpha=args.alpha, calib_file=args.calib_file,
        calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, target_bits=args.target_bits,
        max_kl=args.max_kl, sequential=args.sequential, first_token_weight=args.first_token_weight, clip=args.clip,
    )
    if args.format != "kiln" and (args.method not in ("rtn", "gptq") or args.target_bits is not None):
        raise KilnError(f"--format {args.format} holds one INT scheme for every layer: use --method rtn or gptq "
                        "without --target-bits")
    opts.validate()  # before the (slow) model load
    loaded = load_model(resolve_model(args.model), dtype=torch.float32, quantized_weights="dequantize")
    report = quantize_model(loaded.model, loaded.tokenizer, opts)
    if args.format == "kiln":
        save_quantized(out, loaded.model, loaded.config, loaded.tokenizer, report.quantization_config)
    else:
        import tempfile

        from kiln.quantization.foreign.export import export_folder, shard_rows_of

        with tempfile.TemporaryDirectory() as tmp:
            kiln_dir = save_quantized(Path(tmp) / "kiln", loaded.model, loaded.config, loaded.tokenizer,
                                      report.quantization_config)
            shards = shard_rows_of(loaded.model, report.quantization_config["layers"])
            if out.exists():
                out.rmdir()  # empty (checked above); export_folder creates it
            export_folder(kiln_dir, out, args.format, loaded.model.packed_modules, shards, v1=False)
    size = sum(f.stat().st_size for f in out.iterdir()) / (1 << 20)
    print(f"saved {out} ({size:.1f} MiB): {args.method} int{args.bits}"
          f"{'' if args.bits == 8 else f' g{args.group_size}'}, mean {report.quantization_config['mean_bits']} bits; "
          f"held-out KL vs original: mean {report.kl_mean:.4f}, p99 {report.kl_p99:.3f}, "
          f"top-1 agreement {report.top1_agreement:.1%}", file=sys.stderr)
    if report.sensitivity:
        worst = ", ".join(f"{n} {k:.4f}" for n, k in report.sensitivity[:3])
        print(f"most sensitive layers (KL when quantized alone): {worst}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from kiln.entrypoints.cli_common import run_subcommand

    return run_subcommand(register, argv)
