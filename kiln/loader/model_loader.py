"""One entry point to load a model from a path: a .gguf file or a Hugging Face folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.errors import ModelLoadError
from kiln.loader.weights import load_named_weights
from kiln.models.architecture import CausalLM, WeightNames
from kiln.models.registry import get_architecture

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM  # an instance of its architecture's model class (kiln.models.registry)
    config: ModelConfig
    tokenizer: "Tokenizer"  # noqa: F821 - kiln.loader.tokenizer.Tokenizer
    source: Path
    file_format: str  # "gguf" | "safetensors"
    tensor_types: dict[str, int]  # storage type → tensor count, for `kiln info`
    offload: "OffloadReport | None" = None  # noqa: F821 - kiln.offload.weight_offload; set under a weight budget
    huge_pages: "HugePageReport | None" = None  # noqa: F821 - kiln.offload.huge_pages; set when weights moved there


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA and on a CPU with AMX, else fp32.

    Measured on this machine's AVX512-BF16 CPU (no AMX), 2 threads: a 1024 x 576 x 3072 GEMM runs at
    172 GFLOP/s in bf16 (oneDNN) and 328 GFLOP/s in fp32 (MKL), and the default model runs faster
    end to end in fp32 — 1,024-token prefill ~956 vs ~562 tok/s, single-stream decode ~180 vs ~153
    tok/s, 64 x 128 offline 436 vs 350 tok/s (Q4_1 blocks either way). AMX (bf16 tiles) is kept
    on bf16 without a measurement here."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_amx_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def cpu_has_amx_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def use_gguf_blocks(mode: str, device: torch.device) -> bool:
    """Whether GGUF Q4_0/Q4_1/Q8_0 weights stay in blocks: 'native' always, 'dequantize' never,
    'auto' on CPU when the native kernels built (the reference path would be slower than dense)."""
    if mode not in ("auto", "native", "dequantize"):
        raise ValueError(f"quantized_weights must be 'auto', 'native' or 'dequantize', got {mode!r}")
    if mode == "auto":
        from kiln.kernels.native import load_native

        return device.type == "cpu" and load_native()
    return mode == "native"


def plan_gguf_quantized_layers(model: nn.Module, reader: object, keep_dense: bool, names: WeightNames) -> None:
    """Switch every Linear whose GGUF shards all share a native block layout to that layout;
    other layers stay dense and get dequantized weights."""
    from kiln.layers.gguf_quant import block_method, family_of
    from kiln.layers.linear import Linear
    from kiln.loader.gguf_loader import gguf_layer_types

    per_module: dict[str, set[str]] = {}
    for hf_module, types in gguf_layer_types(reader, names).items():
        module_path, _, _ = names.target(hf_module + ".weight")
        per_module.setdefault(module_path, set()).update(types)
    for module_path, types in per_module.items():
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            continue  # unexpected tensors are reported by the weight loader
        family = family_of(types)
        # a layer's columns must be whole blocks: 32 weights, 256 for K-quant super-blocks ('Q6_K', ...)
        unit = 256 if family is not None and family.endswith("_K") else 32
        if isinstance(module, Linear) and family is not None and module.input_size % unit == 0:
            module.set_method(block_method(family, keep_dense))


def safetensors_names(folder: Path) -> list[str]:
    """Every tensor name in the folder's safetensors files (headers only; no tensor is read)."""
    from safetensors import safe_open

    from kiln.loader.safetensors_loader import safetensors_files

    names: list[str] = []
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as sf:
            names.extend(sf.keys())
    return names


def load_model(path: Path | str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               quantized_weights: str = "auto",
               prepare_model: Callable[[nn.Module], None] | None = None,
               weight_offload: "WeightOffloadConfig | None" = None,  # noqa: F821
               huge_pages: bool = False) -> LoadedModel:
    """Load a GGUF file or a Hugging Face folder.

    `quantized_weights` (GGUF only): 'auto' keeps Q4_0/Q4_1/Q8_0 matrices in their blocks for
    kiln's native kernels when those are available on CPU (small batches) plus a dense copy in
    `dtype` for large batches; 'native' keeps the blocks only (memory-lean; large batches
    dequantize per call); 'dequantize' expands every tensor to `dtype` (the reference path
    the tests compare with). `prepare_model(model)` runs once the model is built and before any weight
    is planned or loaded (tensor parallel resizes the layers to one rank's share there).
    `weight_offload` (kiln.offload): keep at most its budget of weights in RAM and stream the other decoder
    layers from a file; block-quantized layers then keep no dense copies (as with 'native').
    `huge_pages` (CPU, without `weight_offload`): the loaded weights move into one mapping advised for
    transparent huge pages (kiln.offload.huge_pages); `LoadedModel.huge_pages` reports it.
    """
    from kiln.loader.tokenizer import Tokenizer

    path = Path(path)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    offload = None
    if path.is_dir():
        from kiln.loader.safetensors_loader import hf_model_config, iter_safetensors_weights, safetensors_files

        from kiln.quantization.checkpoint import plan_quantized_layers
        from kiln.loader.safetensors_loader import read_config_json

        from kiln.quantization.foreign import is_foreign, plan_foreign_layers

        cfg = hf_model_config(path)
        arch = get_architecture(cfg.architecture, path)
        config_json = read_config_json(path)
        foreign = is_foreign(config_json.get("quantization_config"))  # GPTQ / AWQ / compressed-tensors
        # under a budget: built on the meta device and loaded layer by layer straight into the spill file
        if weight_offload is not None and weight_offload.streamed_load and prepare_model is None:
            from kiln.loader.streamed_load import load_safetensors_streamed

            try:
                model, offload = load_safetensors_streamed(path, cfg, arch, config_json, torch_dtype, device,
                                                           weight_offload)
            except ValueError as exc:
                raise ModelLoadError(path, str(exc)) from None
        else:
            model = arch.model_class(cfg, torch_dtype, device)
            if prepare_model is not None:
                prepare_model(model)
            weights = iter_safetensors_weights(path)
            if foreign:
                quantized = config_json["quantization_config"]
                plan = plan_foreign_layers(model, quantized, path / "config.json", safetensors_names(path),
                                           arch.weight_names)
                weights = plan.translate(weights)
            else:
                quantized = plan_quantized_layers(model, config_json, path / "config.json")
            load_named_weights(model, weights, path, arch.weight_names)
            if quantized is not None:
                model.finalize_quantized_layers()  # repack for the native kernels where they apply
        tokenizer = Tokenizer.from_hf_dir(path)
        types: dict[str, int] = {}
        from safetensors import safe_open

        for f in safetensors_files(path):
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    t = str(sf.get_slice(name).get_dtype())
                    types[t] = types.get(t, 0) + 1
        fmt = "safetensors"
    elif path.is_file():
        from kiln.loader.gguf_loader import gguf_model_config, open_gguf, rope_freq_factors

        # the streamed load keeps its peak near the budget: the library reader's metadata alone is ~170 MiB
        streamed = weight_offload is not None and weight_offload.streamed_load and prepare_model is None
        reader = open_gguf(path, lean=streamed)
        cfg = gguf_model_config(reader, path)
        factors = rope_freq_factors(reader)
        if factors is not None:
            cfg.extra["rope_freq_factors"] = factors
        arch = get_architecture(cfg.architecture, path)
        # before the weights: its transient copies of the vocabulary then never add to the weights' peak
        tokenizer = Tokenizer.from_gguf(reader)  # one header parse: a 262k vocabulary takes seconds
        keep_blocks = use_gguf_blocks(quantized_weights, device)
        if streamed:
            # under a budget: built on the meta device and loaded layer by layer straight into the spill file
            from kiln.loader.streamed_load import load_gguf_streamed

            try:
                model, offload = load_gguf_streamed(reader, cfg, arch, path, torch_dtype, device, keep_blocks,
                                                    weight_offload)
            except ValueError as exc:
                raise ModelLoadError(path, str(exc)) from None
        else:
            model = _load_gguf_resident(reader, cfg, arch, path, torch_dtype, device, quantized_weights,
                                        keep_blocks, prepare_model, weight_offload is None)
        types = {}
        for t in reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        fmt = "gguf"
    else:
        raise ModelLoadError(path, "no such file or folder")
    if tokenizer.chat_template is None and arch.default_chat_template is not None:
        tokenizer.chat_template = arch.default_chat_template
    model.eval()
    if weight_offload is not None:
        from kiln.offload.weight_offload import apply_offload, finish_offload

        if offload is not None:
            finish_offload(model, offload)
        else:
            try:
                offload = apply_offload(model, weight_offload)
            except ValueError as exc:
                raise ModelLoadError(path, str(exc)) from None
    huge = None
    if huge_pages and weight_offload is None and device.type == "cpu":
        from kiln.offload.huge_pages import move_weights_to_huge_pages

        huge = move_weights_to_huge_pages(model)
    return LoadedModel(model, cfg, tokenizer, path, fmt, types, offload, huge)


def _load_gguf_resident(reader: object, cfg: ModelConfig, arch: object, path: Path, torch_dtype: torch.dtype,
                        device: torch.device, quantized_weights: str, keep_blocks: bool,
                        prepare_model: Callable[[nn.Module], None] | None, may_keep_dense: bool) -> nn.Module:
    """The whole model built and loaded in RAM (no budget; or tensor parallel, whose `prepare_model` resizes
    the built layers)."""
    from kiln.loader.gguf_loader import iter_gguf_weights

    model = arch.model_class(cfg, torch_dtype, device)
    if prepare_model is not None:
        prepare_model(model)
    keep_dense = quantized_weights == "auto" and may_keep_dense
    if keep_blocks:
        plan_gguf_quantized_layers(model, reader, keep_dense, arch.weight_names)
        model.keep_gguf_blocks = True
        model.keep_dense_copies = keep_dense
    load_named_weights(model, iter_gguf_weights(reader, cfg, path, keep_blocks=keep_blocks), path,
                       arch.weight_names)
    if keep_blocks:
        model.finalize_quantized_layers()
    return model
