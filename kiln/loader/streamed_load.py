"""Load a model under `--max-weight-memory` without ever holding all of its weights in RAM (GGUF files and
Hugging Face safetensors folders alike: a `StreamedSource` per format).

The eager path (kiln.offload.weight_offload.offload_weights) loads the whole model, then moves the decoder
layers past the budget into the spill file: its load-time peak is the whole model and more. Here the model
is built on the meta device (no storage at all), and then:

1. the parts outside the decoder layers load first (embeddings, LM head, final norm; RoPE tables are computed
   at construction). A tied embedding kept in blocks becomes the quantized LM head, and lookups are served
   from those blocks (`BlockEmbedding`): the dense table is never built;
2. the split is decided before any layer is read, by the same rule as the eager path
   (`split_layers`: the fixed part, then whole layers from the first while the budget lasts), from the meta
   tensors' shapes — a layer's repacked buffers are allocated by its method before loading, so their
   sizes are known up front;
3. layer by layer: its tensors are materialized on the CPU, its checkpoint tensors read, its Linears
   finalized (`finalize_quantized_layers(layer)`), and a layer past the budget is moved into the spill file
   and dropped from the process before the next layer is read; the GGUF file's pages that layer used leave
   the resident set too (`release_tensor_pages`).

So the load holds at most the resident part, one layer and one tensor's transient copies, plus the GGUF
reader's own header objects. A safetensors folder loads the same way: its tensors are grouped by layer from
their names; every file is mapped read-only for the load (kiln.loader.safetensors_mapped) and each tensor's
pages leave the process once it is copied into the model.

Invariants:
- the resulting model is the eager path's: the same tensors in the same layout (same kernels, bit-identical
  outputs), the same layers resident and spilled, the same `OffloadReport`;
- no meta tensor survives a successful load (every one the checkpoint fills is listed by `expected_shards`,
  and a missing tensor is the same `ModelLoadError` as the eager path's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kiln.errors import ModelLoadError
from kiln.loader.weights import (
    expected_shards,
    is_tied_block_embedding,
    load_tensor,
    weight_targets,
)
from kiln.models.architecture import WeightNames
from kiln.offload.spill_file import SpillFile
from kiln.offload.weight_offload import (
    OffloadReport,
    WeightOffloadConfig,
    check_fixed_part,
    install_streamer,
    linear_tensors,
    model_weight_tensors,
    plan_spill,
    return_freed_heap,
    spill_layer,
    split_layers,
    unique_bytes,
)

FIXED = -1  # group key of the tensors outside the decoder layers


class _SkipInPlaceOnMeta(TorchFunctionMode):
    """Skips in-place ops on meta tensors while a model is built there: they compute no values, yet
    `nn.Embedding`'s random init (`normal_`) on a meta tensor goes through torch's Python references, whose
    first call imports torch._dynamo and triton — measured +140 MiB resident during the load, for values the
    checkpoint overwrites anyway."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # nn.init's functions pass their tensor as a keyword (`tensor=`), Tensor methods positionally
        target = args[0] if args else kwargs.get("tensor")
        if name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def build_on_meta(model_class: Any, cfg: Any, dtype: torch.dtype) -> nn.Module:
    """`model_class(cfg, dtype, meta)`: every parameter and buffer without storage (RoPE tables aside,
    which are computed on the CPU: kiln.layers.rotary)."""
    with _SkipInPlaceOnMeta():
        return model_class(cfg, dtype, torch.device("meta"))


def materialize(module: nn.Module) -> None:
    """Give `module`'s own meta parameters and buffers (not its children's) zeroed CPU storage. Nothing
    holds the meta tensors at this point (plans and caches are built after loading)."""
    for name, p in list(module._parameters.items()):
        if p is not None and p.is_meta:
            module._parameters[name] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=False)
    for name, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


def meta_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes the meta tensors among `tensors` will take once materialized (each object counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.is_meta and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def layer_of(hf_name: str, names: WeightNames, num_layers: int) -> int:
    """The decoder layer a checkpoint tensor (by its Hugging Face name) belongs to; FIXED for the rest."""
    parts = names.target(hf_name)[0].split(".")
    if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < num_layers:
        return int(parts[1])
    return FIXED


def group_by_layer(reader: Any, names: WeightNames, num_layers: int) -> dict[int, list[Any]]:
    """The GGUF file's tensors by decoder layer (FIXED for the rest), whatever order the file stores them in."""
    groups: dict[int, list[Any]] = {i: [] for i in [FIXED, *range(num_layers)]}
    for tensor in reader.tensors:
        hf = names.hf_name(tensor.name)
        groups[FIXED if hf is None else layer_of(hf, names, num_layers)].append(tensor)
    return groups


class StreamedSource(Protocol):
    """One checkpoint format for `load_streamed`: its tensors grouped by decoder layer (FIXED: the rest), and a
    group's (Hugging Face name, tensor) pairs, read when asked. `weights(group)` must leave none of the group's
    file pages in the process once it is exhausted (the load's peak depends on it)."""

    groups: dict[int, list[Any]]

    def weights(self, group: list[Any]) -> Iterator[tuple[str, torch.Tensor]]: ...


class GGUFSource:
    """A GGUF file's tensors (kiln.loader.gguf_loader), its blocks kept or dequantized as `keep_blocks` says."""

    def __init__(self, reader: Any, cfg: Any, path: Path, names: WeightNames, num_layers: int,
                 keep_blocks: bool) -> None:
        self.reader, self.cfg, self.path, self.keep_blocks = reader, cfg, path, keep_blocks
        self.groups = group_by_layer(reader, names, num_layers)

    def weights(self, group: list[Any]) -> Iterator[tuple[str, torch.Tensor]]:
        from kiln.loader.gguf_loader import iter_gguf_weights, release_tensor_pages

        yield from iter_gguf_weights(SimpleNamespace(tensors=group), self.cfg, self.path, keep_blocks=self.keep_blocks)
        release_tensor_pages(self.reader, group)


class SafetensorsSource:
    """A Hugging Face folder's *.safetensors files (single or sharded), read as views of their mappings
    (kiln.loader.safetensors_mapped): each tensor is copied once, from the file pages into the model's tensor,
    and its pages leave the process as soon as it is loaded. `translate` (a GPTQ / AWQ / compressed-tensors
    folder's `ForeignPlan.translate`) turns each group's tensors into kiln's buffers: a module's parts all
    belong to one layer, so a group holds every part it needs."""

    def __init__(self, folder: Path, names: WeightNames, num_layers: int,
                 translate: Callable[[Iterable[tuple[str, torch.Tensor]]], Iterator[tuple[str, torch.Tensor]]]
                 | None = None) -> None:
        from kiln.loader.safetensors_loader import safetensors_files
        from kiln.loader.safetensors_mapped import MappedSafetensors

        self.files = {file: MappedSafetensors(file) for file in safetensors_files(folder)}
        self.translate = translate
        self.groups: dict[int, list[Any]] = {i: [] for i in [FIXED, *range(num_layers)]}
        for file, mapped in self.files.items():
            for name in mapped.keys():
                self.groups[layer_of(name, names, num_layers)].append((file, name))

    def tensor_names(self) -> list[str]:
        return [name for group in self.groups.values() for _, name in group]

    def weights(self, group: list[Any]) -> Iterator[tuple[str, torch.Tensor]]:
        raw = self._read(group)
        return self.translate(raw) if self.translate is not None else raw

    def _read(self, group: list[Any]) -> Iterator[tuple[str, torch.Tensor]]:
        for file, name in group:
            mapped = self.files[file]
            # the consumer copies it (or, translating, holds the view until its module is complete: a released
            # page of a view is read back from the file when touched)
            yield name, mapped.tensor(name)
            mapped.release(name)


def load_gguf_streamed(reader: Any, cfg: Any, arch: Any, path: Path, dtype: torch.dtype, device: torch.device,
                       keep_blocks: bool, config: WeightOffloadConfig) -> tuple[nn.Module, OffloadReport]:
    """Build and load the GGUF model in `path` within `config`'s budget (see the module docstring).

    Raises ValueError (the budget is below the fixed part) and ModelLoadError (bad tensors)."""
    from kiln.loader.model_loader import plan_gguf_quantized_layers

    names = arch.weight_names
    model = build_on_meta(arch.model_class, cfg, dtype)
    model.device = device  # where materialized tensors (and the quantized tied head) live
    if keep_blocks:
        plan_gguf_quantized_layers(model, reader, False, names)  # buffers sized on meta: the split needs them
        model.keep_gguf_blocks = True
        model.keep_dense_copies = False
    source = GGUFSource(reader, cfg, path, names, len(model.layers), keep_blocks)
    return load_streamed(model, source, path, names, config)


def load_safetensors_streamed(folder: Path, cfg: Any, arch: Any, config_json: dict, dtype: torch.dtype,
                              device: torch.device, config: WeightOffloadConfig) -> tuple[nn.Module, OffloadReport]:
    """Build and load the Hugging Face folder `folder` within `config`'s budget: full-precision weights, kiln's
    own quantized checkpoints (`kiln quantize`) and GPTQ / AWQ / compressed-tensors ones (translated to kiln's
    INT layout group by group). Their methods are planned on the meta model, as the eager path plans them on
    the built one.

    Raises ValueError (the budget is below the fixed part) and ModelLoadError (bad tensors)."""
    from kiln.layers.linear import Linear
    from kiln.layers.quant_linear import QuantizedBuffersMethod
    from kiln.quantization.checkpoint import plan_quantized_layers
    from kiln.quantization.foreign import is_foreign, plan_foreign_layers

    names = arch.weight_names
    model = build_on_meta(arch.model_class, cfg, dtype)
    model.device = device
    qc = config_json.get("quantization_config")
    source = SafetensorsSource(folder, names, len(model.layers))
    if is_foreign(qc):
        plan = plan_foreign_layers(model, qc, folder / "config.json", source.tensor_names(), names)
        source.translate = plan.translate
    else:
        plan_quantized_layers(model, config_json, folder / "config.json")
    for module in model.modules():  # what finalize adds (native block layouts) counts in the split too
        if isinstance(module, Linear) and isinstance(module.method, QuantizedBuffersMethod):
            for name, (shape, dt) in module.method.finalized_buffer_specs(module, device).items():
                module.register_buffer(name, torch.empty(shape, dtype=dt, device="meta"), persistent=False)
    return load_streamed(model, source, folder, names, config)


def load_streamed(model: nn.Module, source: StreamedSource, path: Path, names: WeightNames,
                  config: WeightOffloadConfig) -> tuple[nn.Module, OffloadReport]:
    """Load `source` into `model` (built on the meta device, its quantized layers planned) within `config`'s
    budget: the fixed part, then the split, then layer by layer, each spilled layer moved into the spill file
    before the next is read (see the module docstring)."""
    layers: nn.ModuleList = model.layers
    needed = expected_shards(model)

    def load(group: list[Any]) -> None:
        _load_weights(model, source.weights(group), path, names, needed)

    load(source.groups[FIXED])
    for _, child in model.named_children():
        if child is not layers:
            model.finalize_quantized_layers(child)  # the LM head (tied or not)
    fixed, resident, spilled, used, planned = _split(model, config.budget_bytes)
    layout, offsets, regions = plan_spill(planned)
    spill = SpillFile(layout.size, config.directory) if spilled else None
    for i, layer in enumerate(layers):
        load(source.groups[i])
        model.finalize_quantized_layers(layer)
        if i in regions:
            entries = linear_tensors(layer)
            got = [(tuple(t.shape), t.dtype) for _, _, t in entries]
            if got != planned[i]:  # a method that replaces its buffers when finalized would need planning here
                raise RuntimeError(f"layer {i}: finalized tensors {got} differ from the planned {planned[i]}")
            spill_layer(spill, entries, offsets[i], regions[i], config.drop_page_cache)
            # glibc keeps what the layer's buffers and packing temporaries freed, and a later layer's
            # allocations do not always fit those holes: measured +1 MiB of heap per layer without this
            return_freed_heap()
    if needed:
        missing = sorted(f"{m}.{p}" + (f" ({s})" if s else "") for m, p, s in needed)
        raise ModelLoadError(path, f"missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # every tensor is either loaded or computed; a meta one left would fail at the first forward
        raise RuntimeError(f"tensors never materialized: {', '.join(leftover[:5])}")
    report = OffloadReport(config.budget_bytes, used, fixed, sum(r.length for r in regions.values()), resident,
                           spilled, not isinstance(model.embed_tokens, nn.Embedding))
    if spill is not None:
        install_streamer(model, spill, regions, config.drop_page_cache, config.read_ahead)
    return model, report


def _split(model: nn.Module, budget: int) -> tuple[int, list[int], list[int], int,
                                                  dict[int, list[tuple[tuple[int, ...], torch.dtype]]]]:
    """With the fixed part loaded and the layers still on meta: (fixed bytes, resident layers, spilled
    layers, resident bytes, spilled layer → planned (shape, dtype) of its `linear_tensors`). ValueError when
    the fixed part alone exceeds the budget (before any layer is read)."""
    layers: nn.ModuleList = model.layers
    per_layer = [linear_tensors(layer) for layer in layers]
    layer_bytes = [meta_bytes([t for _, _, t in entries]) for entries in per_layer]
    # the layers' norms (and anything else outside their Linears) stay resident, as on the eager path
    in_layers = meta_bytes([*layers.parameters(), *layers.buffers()])
    fixed = unique_bytes(model_weight_tensors(model)) + in_layers - sum(layer_bytes)
    check_fixed_part(fixed, budget)
    resident, spilled, used = split_layers(fixed, layer_bytes, budget)
    planned = {i: [(tuple(t.shape), t.dtype) for _, _, t in per_layer[i]] for i in spilled}
    return fixed, resident, spilled, used, planned


def _load_weights(model: nn.Module, weights: Any, source: Path, names: WeightNames,
                  needed: set[tuple[str, str, str | None]]) -> None:
    """`load_named_weights` for a part of the file on a partly meta model: each target module is
    materialized just before its first tensor lands, and a tied embedding kept in blocks becomes the LM head
    and serves lookups from them (no dense table). Loaded keys leave `needed`."""
    from kiln.offload.block_embedding import serve_embedding_from_blocks

    for hf_name, tensor, module, (module_path, param, shard) in weight_targets(model, weights, source, names):
        try:
            if is_tied_block_embedding(model, module, hf_name, tensor):
                model.attach_quantized_tied_head(tensor)
                if serve_embedding_from_blocks(model):
                    needed.discard((module_path, param, shard))
                    continue
            materialize(module)
            load_tensor(module, param, tensor, shard)
        except ValueError as exc:
            raise ModelLoadError(source, f"tensor {hf_name!r}: {exc}") from None
        needed.discard((module_path, param, shard))
