"""Hugging Face model folders: config.json + *.safetensors (single file or sharded with an index).

Only safetensors are read — never pickle-based `.bin` checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.errors import ModelLoadError
from kiln.models.registry import architecture_for_hf


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(folder, "no config.json in this folder (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(path, f"invalid JSON ({exc})") from None


def hf_model_config(folder: Path) -> ModelConfig:
    """The folder's ModelConfig, parsed by its architecture's registry entry (ModelLoadError if unknown)."""
    raw = read_config_json(folder)
    entry = architecture_for_hf(raw, folder / "config.json")
    try:
        return entry.config_from_hf(entry.name, raw, folder)
    except KeyError as exc:
        raise ModelLoadError(folder / "config.json", f"missing key {exc.args[0]!r}") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except json.JSONDecodeError as exc:
            raise ModelLoadError(index, f"invalid JSON ({exc})") from None
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(folder, "no *.safetensors files (kiln never loads pickle .bin checkpoints)")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f, "listed in model.safetensors.index.json but missing")
    return files


def iter_safetensors_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise ModelLoadError(file, f"corrupt or truncated safetensors file ({exc})") from None
