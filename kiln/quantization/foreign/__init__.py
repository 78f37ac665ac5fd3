"""Quantized checkpoints made by other tools, loaded into kiln's own INT layout.

A Hugging Face folder whose config.json has a `quantization_config` of quant_method "gptq"
(AutoGPTQ / GPTQModel), "awq" (AutoAWQ GEMM) or "compressed-tensors" (llm-compressor's
pack-quantized W4A16 / W8A16, int-quantized W8A8 int8 and float-quantized FP8) is loaded in two steps,
mirroring kiln's own quantized folders:

1. `plan_foreign_layers`, before any tensor is read: the config is validated (an unsupported value
   raises one error naming the field and the value), the quantized modules are found from the tensor
   names (a module is quantized when it has the format's marker tensor, e.g. `qweight`), and each
   such kiln Linear is switched to kiln's INT method, filled shard by shard (q/k/v and gate/up are
   separate modules in these checkpoints, fused in kiln).
2. `ForeignPlan.translate` wraps the folder's tensor stream: a quantized module's tensors are held
   until all of them have arrived, then repacked into kiln's buffers (codes, fp16 scales, zeros)
   under kiln's names; every other tensor passes through unchanged.

The weights are never expanded to a dense copy: after loading, `finalize_quantized_layers` repacks
them for kiln's native block kernels exactly as it does for kiln's own INT4/INT8 folders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln.errors import ModelLoadError
from kiln.layers.linear import Linear
from kiln.layers.quant_linear import method_for
from kiln.models.architecture import WeightNames
from kiln.quantization.foreign.awq import AWQReader
from kiln.quantization.foreign.compressed_tensors import CompressedTensorsReader
from kiln.quantization.foreign.gptq import GPTQReader
from kiln.quantization.foreign.layout import FormatReader, UnsupportedField, kiln_tensors

READERS = {"gptq": GPTQReader, "awq": AWQReader, "compressed-tensors": CompressedTensorsReader}


def is_foreign(qc: dict | None) -> bool:
    return qc is not None and qc.get("quant_method") in READERS


@dataclass
class ForeignPlan:
    """Which checkpoint modules are quantized and how to translate their tensors."""

    reader: FormatReader
    source: Path
    # checkpoint module ("model.layers.0.self_attn.q_proj") → (output rows, input size, its tensor leaves present)
    modules: dict[str, tuple[int, int, frozenset[str]]] = field(default_factory=dict)
    # checkpoint modules quantized with act-order that carry a group index (their layers gather inputs)
    act_order: set[str] = field(default_factory=set)

    def translate(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The folder's tensors with each quantized module's replaced by kiln's buffers (same module name)."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            module, _, leaf = name.rpartition(".")
            if module not in self.modules or leaf not in self.reader.parts:
                yield name, tensor
                continue
            parts = pending.setdefault(module, {})
            parts[leaf] = tensor
            n, k, present = self.modules[module]
            if set(parts) != present:
                continue
            del pending[module]
            try:
                tensors = getattr(self.reader, "kiln_buffers", lambda *a: None)(module, parts, n, k)
                if tensors is None:
                    perm = self.reader.input_permutation(module, parts, k) if module in self.act_order else None
                    codes, scale, zero = self.reader.convert(module, parts, n, k)
                    if perm is not None:  # act-order: columns sorted into contiguous groups (layout.act_order_permutation)
                        codes = codes[:, perm].contiguous()
                    tensors = kiln_tensors(codes, scale, zero, self.reader.layout)
                    if module in self.act_order:
                        tensors["input_perm"] = perm if perm is not None else torch.arange(k)
            except ValueError as exc:
                raise ModelLoadError(self.source, f"{self.reader.name} tensors of {module}: {exc}") from None
            for leaf_name, t in tensors.items():
                yield f"{module}.{leaf_name}", t
        if pending:
            first = next(iter(pending))
            raise ModelLoadError(self.source, f"{first}: incomplete {self.reader.name} tensors "
                                              f"(have {sorted(pending[first])}, need {sorted(self.modules[first][2])})")


def plan_foreign_layers(model: nn.Module, qc: dict, source: Path, tensor_names: Iterable[str],
                        names: WeightNames) -> ForeignPlan:
    """Validate `qc`, switch every Linear the checkpoint quantizes to kiln's INT method; see the module docstring."""
    method = qc.get("quant_method")
    try:
        reader = READERS[method](qc)
    except UnsupportedField as exc:
        raise ModelLoadError(source, f"{method} checkpoint: {exc}") from None
    leaves: dict[str, set[str]] = {}
    for name in tensor_names:
        module, _, leaf = name.rpartition(".")
        if leaf in reader.parts:
            leaves.setdefault(module, set()).add(leaf)
    plan = ForeignPlan(reader, source)
    per_linear: dict[str, set[str | None]] = {}
    for module, present in leaves.items():
        if reader.marker not in present:
            continue
        path, _, shard = names.target(f"{module}.{reader.marker}")
        try:
            linear = model.get_submodule(path)
        except AttributeError:
            raise ModelLoadError(source, f"quantized module {module!r} is not part of this architecture") from None
        if not isinstance(linear, Linear):
            raise ModelLoadError(source, f"quantized module {module!r} is not a linear layer")
        n = linear.output_sizes[linear.shard_names.index(shard)]
        plan.modules[module] = (n, linear.input_size, frozenset(present))
        if getattr(reader, "act_order", False) and any(leaf.endswith("g_idx") for leaf in present):
            plan.act_order.add(module)
        per_linear.setdefault(path, set()).add(shard)
    if not plan.modules:
        raise ModelLoadError(source, f"{method} checkpoint without any {reader.marker!r} tensor")
    for path, shards in per_linear.items():
        linear = model.get_submodule(path)
        if shards != set(linear.shard_names):
            raise ModelLoadError(source, f"{path}: kiln fuses {', '.join(map(str, linear.shard_names))} into one layer, "
                                         f"but the checkpoint quantizes only {', '.join(map(str, sorted(shards)))}")
        entry = reader.entry() if hasattr(reader, "entry") else reader.layout.entry()
        modules = [m for m in plan.modules if names.target(f"{m}.{reader.marker}")[0] == path]
        if any(m in plan.act_order for m in modules):
            if not all(m in plan.act_order for m in modules):
                raise ModelLoadError(source, f"{path}: some of its modules have an act-order g_idx and some do not")
            entry = {**entry, "act_order": True}
        linear.set_method(method_for(entry))
        linear.method.buffers_by_shard = True
    return plan
