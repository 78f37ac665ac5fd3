"""Read a PEFT LoRA adapter folder and lay its matrices out on kiln's (fused) linear layers.

A PEFT folder holds `adapter_config.json` (r, lora_alpha, target_modules, use_rslora, ...) and
`adapter_model.safetensors` with, per adapted module, `...<module>.lora_A.weight` [r, in] and
`...<module>.lora_B.weight` [out, r]; the module's output becomes W x + s · B A x with
s = lora_alpha / r (lora_alpha / sqrt(r) under rsLoRA).

kiln fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, so one kiln layer may carry up
to three PEFT modules. `LayerDelta` keeps them per shard: A stacked [r, n_shards, in] (a shard the
adapter leaves alone holds zeros) and B over the fused output rows [out, r] with the scale folded
in (each output row belongs to exactly one shard, so one B holds every shard's matrix).

Every problem is a `LoRAError` naming the folder and what to do; nothing is half-loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.layers.linear import Linear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT module names kiln can adapt: the seven projections of a Llama-family decoder layer.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


class LoRAError(KilnError, ValueError):
    """An adapter cannot be used with this model (bad folder, rank too large, other base model...)."""


@dataclass(slots=True)
class LayerDelta:
    """One kiln layer's share of an adapter. Invariant: a.shape == [rank, n_shards, in],
    b.shape == [out, rank]; shards not in `shards` are zero in both."""

    a: torch.Tensor
    b: torch.Tensor
    shards: frozenset[int]


@dataclass(slots=True)
class LoRAAdapter:
    """A loaded adapter: kiln layer path (`layers.3.self_attn.qkv_proj`) → its delta, all at `rank`."""

    name: str
    path: str
    rank: int
    layers: dict[str, LayerDelta]

    def num_bytes(self) -> int:
        return sum(d.a.numel() * d.a.element_size() + d.b.numel() * d.b.element_size() for d in self.layers.values())


def _read_config(folder: Path) -> dict:
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise LoRAError(f"{folder}: no such adapter folder (a PEFT adapter is a folder with {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE})")
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / needed).is_file():
            hint = " (adapter_model.bin is not read: convert it with peft's save_pretrained(safe_serialization=True))" \
                if needed == WEIGHTS_FILE and (folder / "adapter_model.bin").exists() else ""
            raise LoRAError(f"{folder}: missing {needed}; a PEFT adapter folder holds {CONFIG_FILE} and "
                            f"{WEIGHTS_FILE}{hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise LoRAError(f"{cfg_path}: not valid JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; kiln serves LoRA adapters only")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if cfg.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if unsupported:
        raise LoRAError(f"{cfg_path}: {', '.join(unsupported)} not supported; kiln serves plain LoRA "
                        "(one r and lora_alpha, no DoRA, no trained biases or extra modules)")
    return cfg


def _scale(cfg: dict, rank: int) -> float:
    alpha = float(cfg.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def load_adapter(name: str, path: str | Path, model: nn.Module, max_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    """Read the PEFT folder at `path` and map it onto `model`'s Linears (in `dtype`, on the CPU).

    Raises LoRAError for a missing file, a rank above `max_rank`, a module kiln does not adapt, or
    matrices whose shapes do not fit this model (an adapter trained for another base model)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    cfg = _read_config(folder)
    rank = int(cfg.get("r", 0))
    if rank < 1:
        raise LoRAError(f"{folder}/{CONFIG_FILE}: r must be a positive integer, got {cfg.get('r')!r}")
    if rank > max_rank:
        raise LoRAError(f"{folder}: rank {rank} exceeds --max-lora-rank {max_rank}; restart with "
                        f"--max-lora-rank {rank} or more")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise LoRAError(f"{folder}/{WEIGHTS_FILE}: cannot read it ({exc})") from None
    pairs: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LoRAError(f"{folder}: tensor {key!r} is not a LoRA matrix of a decoder layer; kiln adapts "
                            f"{', '.join(TARGET_MODULES)} only (no embedding or lm_head adapters)")
        layer, block, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in TARGET_MODULES:
            raise LoRAError(f"{folder}: target module {module!r} is not one kiln can adapt "
                            f"({', '.join(TARGET_MODULES)})")
        pairs.setdefault((layer, block, module), {})[ab] = tensor
    if not pairs:
        raise LoRAError(f"{folder}/{WEIGHTS_FILE}: holds no LoRA matrices")
    scale = _scale(cfg, rank)
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    num_layers = model.config.num_hidden_layers
    deltas: dict[str, LayerDelta] = {}
    for (layer, block, module), ab in sorted(pairs.items()):
        where = f"{folder}: layers.{layer}.{block}.{module}"
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{where} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if layer >= num_layers:
            raise LoRAError(f"{where}: this model has {num_layers} layers; the adapter was trained for another "
                            "base model")
        fused, shard = packed.get(module, (module, None))
        path_in_model = f"layers.{layer}.{block}.{fused}"
        try:
            target = model.get_submodule(path_in_model)
        except AttributeError:
            target = None
        if not isinstance(target, Linear):
            raise LoRAError(f"{where}: this model has no such layer; the adapter was trained for another base model")
        delta = _place(where, target, shard, ab["A"], ab["B"], rank, scale, dtype, deltas.get(path_in_model))
        deltas[path_in_model] = delta
    return LoRAAdapter(name, str(folder), rank, deltas)


def _place(where: str, layer: Linear, shard: str | None, a: torch.Tensor, b: torch.Tensor, rank: int, scale: float,
           dtype: torch.dtype, delta: LayerDelta | None) -> LayerDelta:
    """Put one PEFT module's (A, B) into its kiln layer's LayerDelta (created on first use)."""
    j = layer.shard_names.index(shard)
    rows = layer.shard_slice(shard)
    out = rows.stop - rows.start
    if a.shape != (rank, layer.input_size) or b.shape != (out, rank):
        raise LoRAError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this model's "
                        f"layer (expected ({rank}, {layer.input_size}) / ({out}, {rank})); the adapter was trained "
                        "for another base model")
    if delta is None:
        n = len(layer.shard_names)
        delta = LayerDelta(torch.zeros(rank, n, layer.input_size, dtype=dtype),
                           torch.zeros(sum(layer.output_sizes), rank, dtype=dtype), frozenset())
    delta.a[:, j] = a.to(dtype)
    # fold the scale into B in fp32 first, so a bf16 copy is rounded once
    delta.b[rows] = (b.float() * scale).to(dtype)
    delta.shards = delta.shards | {j}
    return delta
