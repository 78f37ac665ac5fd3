"""One entry point to load a model from a path: a .gguf file or a Hugging Face folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.errors import ModelLoadError
from kiln.loader.weights import load_named_weights
from kiln.models.llama import LlamaForCausalLM

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: "Tokenizer"  # noqa: F821 - kiln.loader.tokenizer.Tokenizer
    source: Path
    file_format: str  # "gguf" | "safetensors"
    tensor_types: dict[str, int]  # storage type → tensor count, for `kiln info`


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bf16 where it is fast (CUDA, or a CPU with AVX512-BF16/AMX), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(path: Path | str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> LoadedModel:
    from kiln.loader.tokenizer import Tokenizer

    path = Path(path)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if path.is_dir():
        from kiln.loader.safetensors_loader import hf_model_config, iter_safetensors_weights, safetensors_files

        cfg = hf_model_config(path)
        model = LlamaForCausalLM(cfg, torch_dtype, device)
        load_named_weights(model, iter_safetensors_weights(path), path)
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
        from kiln.loader.gguf_loader import gguf_model_config, iter_gguf_weights, open_gguf, rope_freq_factors

        reader = open_gguf(path)
        cfg = gguf_model_config(reader, path)
        factors = rope_freq_factors(reader)
        if factors is not None:
            cfg.extra["rope_freq_factors"] = factors
        model = LlamaForCausalLM(cfg, torch_dtype, device)
        load_named_weights(model, iter_gguf_weights(reader, cfg, path), path)
        tokenizer = Tokenizer.from_gguf(path)
        types = {}
        for t in reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        fmt = "gguf"
    else:
        raise ModelLoadError(path, "no such file or folder")
    model.eval()
    return LoadedModel(model, cfg, tokenizer, path, fmt, types)
