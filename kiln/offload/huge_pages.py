"""Resident weights in transparent huge pages: one anonymous mapping, advised MADV_HUGEPAGE, holds them all.

Why: a decode step streams every weight from DRAM once. In 4 KiB pages the default model's ~95 MiB of
blocks are ~24k pages per step, and each new page costs a TLB miss and stops the hardware prefetcher at the
page boundary; in 2 MiB pages they are ~50. Linux gives huge pages to anonymous memory only where a process
asks for them when THP is in `madvise` mode (the default of many distributions, and of this machine), and
torch's allocator never asks. Measured (AMD EPYC Zen 4, THP `madvise`, 2 threads, 5 alternating pairs of
fresh processes, 2026-11-30): the default model's single-stream decode 165-184 tok/s in 4 KiB pages against
192-218 here (1.09-1.28x per pair, median 1.17x); Gemma 3 270M level (its 178 MB Q8_0 LM head streams at
the same rate either way). A process that must not hold 2 MiB pages turns this off
(`--no-huge-page-weights`).

Invariants:
- every moved tensor keeps its values, dtype, shape, strides and aliasing: tensors that shared a storage
  view one copy of the bytes they used (their span of the storage) in the arena;
- Parameters stay the same objects (their `.data` moves), buffers and plain tensor attributes are replaced
  in their modules; nothing else may hold a weight tensor when this runs (the fused decode plans are built
  lazily, after it);
- the arena lives as long as any tensor viewing it (`torch.frombuffer` keeps the mapping alive);
- when the kernel gives no huge pages (THP `never`, none free) the arena is ordinary memory: same values,
  same speed as before, and `HugePageReport.huge_bytes` says so.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kiln.offload.spill_file import smaps_bytes

HUGE_PAGE = 2 << 20
TENSOR_ALIGN = 64  # SIMD loads in the kernels want at least cache-line alignment
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class HugePageReport:
    """What `move_weights_to_huge_pages` did: bytes moved into the arena, and how many of the arena's bytes the
    kernel backs with huge pages (from /proc/self/smaps; 0 where it gave none)."""

    moved_bytes: int
    huge_bytes: int
    thp_mode: str

    def summary(self) -> str:
        mib = 1 << 20
        return (f"{self.moved_bytes / mib:.1f} MiB in one mapping advised for transparent huge pages, "
                f"{self.huge_bytes / mib:.1f} MiB of it in 2 MiB pages (THP mode: {self.thp_mode})")


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'; 'unavailable' off Linux)."""
    try:
        text = THP_MODE_FILE.read_text()
    except OSError:
        return "unavailable"
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return "unavailable"


def weight_slots(model: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """(module, kind, name, tensor) for every CPU tensor a module holds: kind is 'param', 'buffer' or 'attr'
    (a plain tensor attribute such as a dense copy). A tensor reachable from several modules is listed once
    per place (each place must be re-pointed)."""
    slots: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                slots.append((module, "param", name, p))
        for name, b in module._buffers.items():
            if b is not None:
                slots.append((module, "buffer", name, b))
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                slots.append((module, "attr", name, value))
    # an opaque oneDNN copy (kiln.kernels.packed_linear) has no storage to move; oneDNN allocated it itself
    return [s for s in slots if s[3].device.type == "cpu" and s[3].numel() > 0 and not s[3].is_sparse
            and not s[3].is_mkldnn]


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, end) bytes of `t`'s storage that `t` can touch."""
    item = t.element_size()
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.storage_offset() * item, (last + 1) * item


def _storage_spans(slots: list[tuple[nn.Module, str, str, torch.Tensor]]) -> dict[int, tuple[int, int]]:
    """Storage address → [first, end) bytes its tensors use."""
    spans: dict[int, tuple[int, int]] = {}
    for _, _, _, t in slots:
        key = t.untyped_storage().data_ptr()
        lo, hi = _byte_span(t)
        old = spans.get(key)
        spans[key] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return spans


def move_weights_to_huge_pages(model: nn.Module) -> HugePageReport:
    """Copy every CPU weight tensor of `model` into one huge-page-advised mapping (see the module docstring)
    and point the model at the copies. The old storages are freed as their tensors are re-pointed."""
    slots = weight_slots(model)
    spans = _storage_spans(slots)
    offsets: dict[int, int] = {}
    size = 0
    for key, (lo, hi) in spans.items():
        # the copy starts at a 64-byte boundary plus the span's own misalignment, so every tensor keeps the
        # alignment it had inside its storage (a storage's start is 64-byte aligned by torch's allocator)
        size = (size + TENSOR_ALIGN - 1) // TENSOR_ALIGN * TENSOR_ALIGN + lo % TENSOR_ALIGN
        offsets[key] = size
        size += hi - lo
    mode = thp_mode()
    if size == 0:
        return HugePageReport(0, 0, mode)
    length = (size + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    # one huge page more than needed: the mapping's start is only page-aligned, and the arena begins at the
    # first 2 MiB boundary inside it so that every 2 MiB of weights can be one huge page
    mapping = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without THP: ordinary pages
            pass
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    skew = (-whole.data_ptr()) % HUGE_PAGE
    arena = whole[skew:skew + length]
    # a copy per distinct view (storage, offset, shape, strides, dtype), not per old tensor object: the slots
    # are dropped as they are re-pointed, so an old storage is freed once its last place moves and the move
    # never holds two copies of the weights (a Parameter's slot frees nothing: the object stays, its data moves)
    moved: dict[tuple[object, ...], torch.Tensor] = {}
    copied: set[int] = set()
    typed: dict[torch.dtype, torch.Tensor] = {}
    moved_params: set[int] = set()  # a Parameter reachable from two modules moves once (it is one object)
    with torch.no_grad():
        while slots:
            module, kind, name, t = slots.pop()
            if kind == "param" and id(t) in moved_params:
                continue
            key = t.untyped_storage().data_ptr()
            view = (key, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            new = moved.get(view)
            if new is None:
                lo, hi = spans[key]
                base = offsets[key] - lo  # arena byte where the old storage's byte 0 would sit
                if key not in copied:
                    source = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())[lo:hi]
                    arena[offsets[key]:offsets[key] + hi - lo].copy_(source)
                    del source
                    copied.add(key)
                item = t.element_size()
                if t.dtype not in typed:
                    typed[t.dtype] = whole.view(t.dtype)  # storage offsets below count from the mapping's start
                start = skew + base + t.storage_offset() * item  # a multiple of item: base is 64-aligned
                new = typed[t.dtype].as_strided(t.shape, t.stride(), start // item)
                moved[view] = new
            if kind == "param":
                t.data = new
                moved_params.add(id(t))
            elif kind == "buffer":
                module._buffers[name] = new
            else:
                module.__dict__[name] = new
            del t
    moved.clear()
    from kiln.offload.weight_offload import return_freed_heap

    return_freed_heap()
    return HugePageReport(size, smaps_bytes(arena.data_ptr(), "AnonHugePages"), mode)

