"""`--max-weight-memory`: keep the weights that fit in RAM, stream the other decoder layers from a file.

What stays resident: the part that cannot be spilled (embeddings or the blocks that serve them, the LM
head, norms, RoPE tables), then the first decoder layers while the budget lasts (`split_layers`, the one
rule). The linear weights of every later layer live in a `SpillFile` (kiln.offload.spill_file). A GGUF model
is loaded straight into that split (kiln.loader.streamed_load: built on the meta device, each layer moved
into the file before the next is read, so the load's peak stays near the budget); otherwise
`offload_weights` moves the layers of a model already loaded (memory-lean: no dense copies of
block-quantized layers), one layer at a time.

During a forward pass each spilled layer is streamed: the compute threads fault its pages in (the kernel
reads ahead within the layer as the faults run sequentially); with `read_ahead`, a background thread also
faults layer *i+1* in while layer *i* computes (`MADV_POPULATE_READ`; skipped when the page cache holds
it) — off by default, since on this 2-core machine it measured no faster than the kernel's own readahead
(benchmarks/weight_offload.py); just after layer *i* runs, its pages leave the process (`MADV_DONTNEED`). So at most one spilled layer is
resident at any moment (two with read-ahead); with `drop_page_cache` they also leave the page cache and every step reads the
disk (the cold-cache measurement; a machine that cannot hold the weights behaves so).

Invariants:
- outputs are bit-identical to the same model held fully resident with the same kernels: only where the
  bytes live changes, never which kernel reads them;
- the fused decode step (which runs every layer in one native call, so it cannot stream per layer) is off
  for an offloaded model, and `decode_plan_status` says so;
- resident bytes = everything outside the spill file; `OffloadReport` states both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.offload.spill_file import Region, SpillFile, SpillLayout


@dataclass(frozen=True)
class WeightOffloadConfig:
    """`--max-weight-memory` and its companions (kiln.engine.arg_utils)."""

    budget_bytes: int
    directory: Path  # where the (unlinked) spill file lives; its disk must hold the spilled layers
    drop_page_cache: bool = False  # measurement: evict streamed layers from the page cache after each use
    read_ahead: bool = False  # fault the next spilled layer in while the current one computes (see WeightStreamer)
    # GGUF: build on the meta device and load layer by layer into the spill file (kiln.loader.streamed_load).
    # False loads the whole model first and moves layers after (the path safetensors folders take; the load-peak
    # test's negative control)
    streamed_load: bool = True

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError(f"--max-weight-memory must be positive, got {self.budget_bytes} bytes")


def weight_offload_config(m: "ModelLoadConfig") -> WeightOffloadConfig | None:  # noqa: F821 - kiln.config
    """The offload settings of a ModelLoadConfig, or None when no weight budget is set."""
    if m.max_weight_memory is None:
        return None
    if m.device != "cpu":
        raise ValueError("--max-weight-memory streams layers into CPU memory; on CUDA keep layers on the CPU "
                         "with a smaller model or more GPU memory (--gpu-layers is not built yet)")
    from kiln.hub import kiln_home

    directory = Path(m.offload_dir) if m.offload_dir else kiln_home() / "offload"
    return WeightOffloadConfig(m.max_weight_memory, directory, m.offload_drop_page_cache, m.offload_read_ahead)


@dataclass
class OffloadReport:
    """What the budget decided, for `kiln info`, the startup line and the memory planner."""

    budget_bytes: int
    resident_bytes: int  # every weight byte in anonymous memory (includes the resident layers)
    fixed_bytes: int  # of which: the part that cannot be spilled (embeddings, LM head, norms, RoPE tables)
    mapped_bytes: int  # decoder-layer weights in the spill file
    resident_layers: list[int] = field(default_factory=list)
    spilled_layers: list[int] = field(default_factory=list)
    embedding_from_blocks: bool = False

    def summary(self) -> str:
        mib = 1 << 20
        return (f"{self.resident_bytes / mib:.1f} MiB resident (budget {self.budget_bytes / mib:.1f} MiB), "
                f"{self.mapped_bytes / mib:.1f} MiB mapped from disk and streamed per step "
                f"({len(self.spilled_layers)} of {len(self.resident_layers) + len(self.spilled_layers)} layers)")


class WeightStreamer:
    """Hooks on the decoder layers that read the next spilled layer ahead and release the finished one."""

    def __init__(self, spill: SpillFile, regions: dict[int, Region], num_layers: int, drop_page_cache: bool,
                 read_ahead: bool) -> None:
        self.spill = spill
        self.regions = regions
        self.num_layers = num_layers
        self.drop_page_cache = drop_page_cache
        self.read_ahead = read_ahead
        self.handles: list[Any] = []

    def install(self, layers: nn.ModuleList) -> None:
        for i, layer in enumerate(layers):
            if self.read_ahead:  # no hook on the per-layer hot path when there is nothing to read ahead
                self.handles.append(layer.register_forward_pre_hook(self._before_hook(i)))
            if i in self.regions:
                self.handles.append(layer.register_forward_hook(self._after_hook(i)))

    def _next_spilled(self, i: int) -> int | None:
        for j in range(i + 1, self.num_layers):
            if j in self.regions:
                return j
        # the last layer reads the first spilled layer ahead for the next step
        first = min(self.regions) if self.regions else None
        return first if first is not None and first <= i else None

    def _before_hook(self, i: int):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, args: Any) -> None:
            if i == 0 and i in self.regions:
                self.spill.prefetch(self.regions[i])
            nxt = self._next_spilled(i)
            if nxt is not None:
                self.spill.prefetch(self.regions[nxt])
        return hook

    def _after_hook(self, i: int):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.spill.release(self.regions[i], self.drop_page_cache)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def linear_tensors(layer: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, attribute, tensor) for every parameter and buffer of the Linear modules inside `layer`,
    plus a resident dense copy if one exists: what a decoder layer streams. Norm weights stay resident
    (tiny), and modules shared between layers (the RoPE tables) are never moved."""
    from kiln.layers.linear import Linear

    out: list[tuple[nn.Module, str, torch.Tensor]] = []
    seen: set[int] = set()
    for module in layer.modules():
        if not isinstance(module, Linear):
            continue
        for name, p in module.named_parameters(recurse=False):
            out.append((module, name, p))
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.numel() > 0:
                out.append((module, name, b))
        dense = getattr(module, "dense_weight", None)
        if isinstance(dense, torch.Tensor):
            out.append((module, "dense_weight", dense))
    unique = []
    for entry in out:  # one tensor reachable twice must move once
        t = entry[2]
        # meta tensors (streamed_load plans on them) and opaque oneDNN copies have no address
        key = id(t) if t.is_meta or t.is_mkldnn else t.data_ptr()
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    """CPU bytes of `tensors`, a tensor reachable twice (same address and size) counted once. Counted per
    tensor, not per storage: spilled tensors are views of one mapping-sized storage."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        key = (id(t) if t.is_mkldnn else t.data_ptr(), nbytes)  # an opaque oneDNN copy has no address
        if key in seen or t.device.type != "cpu":
            continue
        seen.add(key)
        total += nbytes
    return total


def model_weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter, buffer and extra weight attribute (dense copies, the quantized tied head)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        dense = getattr(module, "dense_weight", None)
        if isinstance(dense, torch.Tensor):
            tensors.append(dense)
    head = getattr(model, "quantized_tied_head", None)
    if isinstance(head, nn.Module):
        tensors.extend([*head.parameters(), *head.buffers()])
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _move(module: nn.Module, name: str, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Point `module.name` at `dst` (same values as `src`), keeping parameters parameters."""
    with torch.no_grad():
        dst.copy_(src)  # copy_ reads any layout: src need not be contiguous
    if isinstance(src, nn.Parameter):
        src.data = dst  # the Parameter object stays (optimizers/plans may hold it); its storage moves
    elif name in module._buffers:
        module._buffers[name] = dst
    else:
        setattr(module, name, dst)


def check_fixed_part(fixed: int, budget_bytes: int) -> None:
    """ValueError (with the numbers) when the parts that must stay resident alone exceed the budget."""
    if fixed > budget_bytes:
        mib = 1 << 20
        raise ValueError(f"--max-weight-memory {budget_bytes / mib:.1f} MiB is below the {fixed / mib:.1f} MiB that "
                         f"must stay resident (embeddings, LM head, norms, RoPE tables); give at least "
                         f"{fixed / mib + 1:.0f} MiB or leave the flag off")


def split_layers(fixed: int, layer_bytes: list[int], budget_bytes: int) -> tuple[list[int], list[int], int]:
    """The one residency rule: the fixed part, then whole decoder layers from the first while the budget
    lasts; every layer after the first that does not fit streams. Returns (resident, spilled, resident bytes)."""
    resident, spilled, used = [], [], fixed
    for i, nbytes in enumerate(layer_bytes):
        if not spilled and used + nbytes <= budget_bytes:
            resident.append(i)
            used += nbytes
        else:
            spilled.append(i)
    return resident, spilled, used


def plan_spill(shapes: dict[int, list[tuple[tuple[int, ...], torch.dtype]]]) -> tuple[SpillLayout, dict[int, list[int]],
                                                                                     dict[int, Region]]:
    """Offsets in the spill file of every spilled layer's tensors (layer → [(shape, dtype)], in
    `linear_tensors` order): one page-aligned region per layer."""
    layout = SpillLayout()
    offsets: dict[int, list[int]] = {}
    regions: dict[int, Region] = {}
    for i, entries in shapes.items():
        layout.begin_region()
        offsets[i] = [layout.add(_numel(shape) * _itemsize(dtype)) for shape, dtype in entries]
        regions[i] = layout.end_region()
    return layout, offsets, regions


def spill_layer(spill: SpillFile, entries: list[tuple[nn.Module, str, torch.Tensor]], offsets: list[int],
                region: Region, drop_page_cache: bool) -> None:
    """Move one layer's tensors into `spill` at `offsets`, write them back and drop them from the process.
    The caller must hold no other reference to the old tensors, so their RAM is freed as each one moves."""
    for (module, name, t), offset in zip(entries, offsets):
        _move(module, name, t, spill.tensor(offset, tuple(t.shape), t.dtype))
    entries.clear()
    t = None  # noqa: F841 - the last moved tensor's old storage too
    spill.flush(region)
    spill.release(region, drop_page_cache)


def offload_weights(model: nn.Module, budget_bytes: int, directory: Path, drop_page_cache: bool = False,
                    read_ahead: bool = False) -> OffloadReport:
    """Keep a fully loaded model's weights within `budget_bytes` of RAM by streaming decoder layers from a
    file (the eager path: safetensors folders; GGUF files load straight into the spill file instead, see
    kiln.loader.streamed_load).

    Raises ValueError (with the numbers) when the parts that must stay resident alone exceed the budget.
    """
    from kiln.offload.block_embedding import serve_embedding_from_blocks

    embedding_from_blocks = serve_embedding_from_blocks(model)
    layers: nn.ModuleList = model.layers
    per_layer = [linear_tensors(layer) for layer in layers]
    layer_bytes = [unique_bytes([t for _, _, t in entries]) for entries in per_layer]
    total = unique_bytes(model_weight_tensors(model))
    fixed = total - sum(layer_bytes)
    check_fixed_part(fixed, budget_bytes)
    resident, spilled, used = split_layers(fixed, layer_bytes, budget_bytes)
    report = OffloadReport(budget_bytes, used, fixed, 0, resident, spilled, embedding_from_blocks)
    if not spilled:
        return report
    layout, offsets, regions = plan_spill({i: [(tuple(t.shape), t.dtype) for _, _, t in per_layer[i]]
                                           for i in spilled})
    spill = SpillFile(layout.size, directory)
    for i in spilled:
        # one layer at a time: its RAM copy is dropped (no reference left here) and its file pages written
        # back and released before the next layer moves, so the move needs no memory beyond one layer
        entries, per_layer[i] = per_layer[i], None
        spill_layer(spill, entries, offsets[i], regions[i], drop_page_cache)
    report.mapped_bytes = sum(r.length for r in regions.values())
    install_streamer(model, spill, regions, drop_page_cache, read_ahead)
    return report


def install_streamer(model: nn.Module, spill: SpillFile, regions: dict[int, Region], drop_page_cache: bool,
                     read_ahead: bool) -> None:
    """Hooks that stream the spilled layers during each forward (see WeightStreamer)."""
    streamer = WeightStreamer(spill, regions, len(model.layers), drop_page_cache, read_ahead)
    streamer.install(model.layers)
    # the tensors' storage keeps the mmap object referenced; the streamer keeps the SpillFile (its descriptor,
    # its prefetch thread) for as long as the model lives. Nothing ever closes the mapping explicitly.
    model.weight_streamer = streamer


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def return_freed_heap() -> None:
    """Hand the heap pages the moved layers (and the load's temporaries) freed back to the OS: glibc keeps
    freed memory for reuse, so the process would otherwise look as large as the fully loaded model."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def apply_offload(model: nn.Module, config: WeightOffloadConfig) -> OffloadReport:
    """`offload_weights` for a loaded model, with the fused decode step turned off when layers stream."""
    report = offload_weights(model, config.budget_bytes, config.directory, config.drop_page_cache, config.read_ahead)
    finish_offload(model, report)
    return report


def finish_offload(model: nn.Module, report: OffloadReport) -> None:
    """After the layers moved: return the freed heap to the OS and turn the fused decode step off."""
    return_freed_heap()
    if report.spilled_layers and hasattr(model, "fused_decode_step"):
        model.fused_decode_step = False
        model._decode_plan_status = (f"plain path: {len(report.spilled_layers)} layers stream from disk "
                                     "(--max-weight-memory); the fused step runs every layer in one call")
