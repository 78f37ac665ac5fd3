"""The architectures kiln runs, by name: the one place that knows which model class serves which checkpoint.

A GGUF file names its architecture in `general.architecture` (llama, mistral, qwen2); a Hugging Face
folder in config.json's `architectures` (LlamaForCausalLM, ...), falling back to `model_type`. Both
lead to a `ModelArchitecture` (kiln.models.architecture): the model class, its checkpoint names and
its config parsers. An unknown name is one `ModelLoadError` that lists what is supported.

Adding an architecture: a file under kiln/models/ that defines the model and its `ModelArchitecture`
entries (a tuple named ARCHITECTURES, as kiln/models/llama_checkpoint.py does), plus one line in
`_REGISTERED` below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import ModelLoadError
from kiln.models import gemma3_checkpoint, llama_checkpoint
from kiln.models.architecture import ModelArchitecture

_REGISTERED: tuple[ModelArchitecture, ...] = (
    *llama_checkpoint.ARCHITECTURES,
    *gemma3_checkpoint.ARCHITECTURES,
)
_BY_NAME = {a.name: a for a in _REGISTERED}
_BY_HF_CLASS = {a.hf_class: a for a in _REGISTERED}
if len(_BY_NAME) != len(_REGISTERED) or len(_BY_HF_CLASS) != len(_REGISTERED):
    raise RuntimeError("two registered architectures share a name or a Hugging Face class")


def supported_architectures() -> list[str]:
    """Registered names with their Hugging Face class, as an error message lists them."""
    return [f"{a.name} ({a.hf_class})" for a in _REGISTERED]


def unsupported(source: Path | str, name: object) -> ModelLoadError:
    """The error for an architecture kiln does not know: it names the supported ones."""
    return ModelLoadError(source, f"unsupported architecture {name!r}; kiln supports: "
                                  f"{', '.join(supported_architectures())}")


def get_architecture(name: object, source: Path | str) -> ModelArchitecture:
    """The entry registered as `name` (a GGUF `general.architecture` / `ModelConfig.architecture` value)."""
    entry = _BY_NAME.get(name) if isinstance(name, str) else None
    if entry is None:
        raise unsupported(source, name)
    return entry


def architecture_for_hf(config_json: dict[str, Any], source: Path | str) -> ModelArchitecture:
    """The entry for a Hugging Face config.json: by `architectures[0]`, else by `model_type`."""
    classes = config_json.get("architectures") or []
    entry = _BY_HF_CLASS.get(classes[0] if classes else "")
    model_type = config_json.get("model_type")
    if entry is None and isinstance(model_type, str):
        entry = _BY_NAME.get(model_type)
    if entry is None:
        raise unsupported(source, classes[0] if classes else model_type)
    return entry
