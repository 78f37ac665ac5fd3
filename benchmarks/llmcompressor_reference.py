"""llm-compressor's GPTQ / AWQ on a Hugging Face folder, calibrated on given token windows: the
reference rows of the quantization quality table (benchmarks/quant_quality.py runs this script).

Runs in any environment with `llmcompressor` (the `bench` extra); it imports nothing from kiln, so it
can run in a separate virtual environment when llm-compressor's pinned transformers differs from the
one kiln's tests use. Writes two folders under --out:

    compressed/   what llm-compressor saves (compressed-tensors, pack-quantized): the foreign checkpoint
    dequantized/  the same model with every quantized Linear's weight replaced by its quantize-dequantize
                  value, in fp32, no quantization_config: a plain folder any loader reads, so the
                  evaluation measures llm-compressor's weights and nothing else (AWQ's smoothing, folded
                  into the norms and previous layers, is in there too)

Usage: python llmcompressor_reference.py --hf-dir DIR --windows W.json --method gptq|awq
       --group-size 64 [--sym] --out OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def scheme_groups(bits: int, group_size: int, sym: bool, actorder: str | None) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size,
                               actorder=actorder)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def recipe_for(method: str, bits: int, group_size: int, sym: bool) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if method == "gptq":  # defaults otherwise: block 128, dampening 0.01 of the mean diagonal, static act-order
        return [GPTQModifier(config_groups=scheme_groups(bits, group_size, sym, "static"), ignore=["lm_head"])]
    return [AWQModifier(), QuantizationModifier(config_groups=scheme_groups(bits, group_size, sym, None), ignore=["lm_head"])]


@torch.no_grad()
def dequantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with each quantized Linear's weight quantize-dequantized by its own qparams."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
            continue
        zero = getattr(module, "weight_zero_point", None)
        out[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale, zero, scheme.weights).float()
    for name, tensor in model.state_dict().items():
        leaf = name.rpartition(".")[2]
        if leaf.startswith(("weight_", "input_", "output_")) or name in out:
            continue
        out[name] = tensor.float()
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--windows", required=True, help="JSON list of token-id lists (the calibration windows)")
    parser.add_argument("--method", choices=("gptq", "awq"), required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sym", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for faster host-to-device copies without
        # checking for a device, which raises "Cannot access accelerator device" on a CPU-only machine;
        # pinning buys nothing here, so skip it.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    windows = json.loads(Path(args.windows).read_text())
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe_for(args.method, args.bits, args.group_size, args.sym),
            max_seq_length=max(len(w) for w in windows), num_calibration_samples=len(windows),
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start

    out = Path(args.out)
    dense = out / "dequantized"
    dense.mkdir(parents=True, exist_ok=True)
    save_file(dequantized_state(model), str(dense / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(args.hf_dir) / f).is_file():
            shutil.copy(Path(args.hf_dir) / f, dense / f)
    model.save_pretrained(str(out / "compressed"), save_compressed=True)
    tokenizer.save_pretrained(str(out / "compressed"))
    (out / "run.json").write_text(json.dumps({"llmcompressor": llmcompressor.__version__, "method": args.method,
                                              "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
                                              "calibration_windows": len(windows), "seconds": round(seconds, 1)}) + "\n")


if __name__ == "__main__":
    main()
