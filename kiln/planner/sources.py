"""MODEL → ModelSource: a preset name, a registered model, a GGUF file, a Hugging Face folder or a config.json.

A GGUF is read for its header and tensor table only (the `gguf` reader memory-maps the file and reads no
weight); a folder or config.json only for its config, so nothing is downloaded or loaded to plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.planner.arch import arch_from_gguf_fields, arch_from_hf_config
from kiln.planner.memory import ModelSource, TensorInfo
from kiln.planner.presets import PRESETS

_HF_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _field_value(f: Any) -> Any:
    """A GGUFReader field → a Python value (strings decoded, arrays as lists, scalars unwrapped)."""
    from gguf import GGUFValueType

    if f.types and f.types[0] == GGUFValueType.ARRAY:
        if len(f.types) > 1 and f.types[1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return [f.parts[i][0] for i in f.data]
    if f.types and f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
    return f.parts[f.data[0]][0] if f.data else None


def source_from_gguf(path: Path) -> ModelSource:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:  # only its length matters: decoding 49k-262k strings would take seconds
        fields["tokenizer.ggml.tokens"] = range(len(tokens.data))
    tensors = tuple(TensorInfo(t.name, t.tensor_type.name, int(t.n_bytes), int(t.n_elements)) for t in reader.tensors)
    name = str(fields.get("general.name") or path.stem)
    return ModelSource(arch_from_gguf_fields(fields, {t.name for t in tensors}, name), "gguf", tensors)


def source_from_config(raw: dict[str, Any], name: str, origin: str) -> ModelSource:
    dtype = _HF_DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"), "bf16")
    return ModelSource(arch_from_hf_config(raw, name), origin, native_format=dtype)


def resolve_source(model: str) -> ModelSource:
    """Presets first (no file needed), then registered names and paths (kiln.hub pulls a registered model)."""
    from kiln.hub import REGISTRY, model_path, resolve_model

    key = model.lower()
    if key in REGISTRY and model_path(key).is_file():
        return source_from_gguf(model_path(key))  # the real file: exact tensor sizes
    if key in PRESETS and not Path(model).exists():
        return source_from_config(PRESETS[key], key, "preset")

    path = Path(model).expanduser()
    if not path.exists():
        path = resolve_model(model)
    if path.is_file() and path.suffix == ".gguf":
        return source_from_gguf(path)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise KilnError(f"{model}: need a .gguf file, a folder with config.json, a config.json or a preset "
                        f"({', '.join(PRESETS)})")
    return source_from_config(json.loads(config.read_text()), path.stem if path.is_file() else path.name,
                              "hf" if path.is_dir() else "config.json")
