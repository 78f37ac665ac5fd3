"""Per-layer adapter slots and the batched LoRA delta (the S-LoRA / punica idea, in plain torch).

Each adapted kiln Linear gets one `LayerSlots`: every adapter slot's A [max_rank, n_shards, in] and
B [out, max_rank] in fixed buffers (allocated once: `--max-loras` × `--max-lora-rank` bound the
memory). The layer calls it after its own method's apply, so the base weights stay in whatever
format the method keeps (GGUF blocks, INT4/INT8, bf16): y = base(x) + Σ_segments B_s (A_s x).

The model runner lays a step's tokens out grouped by adapter, so each adapter's tokens are a few
contiguous row ranges (`Segment`s); a segment costs one matmul for A (all shards of a fused layer at
once) and one in-place addmm per shard for B, at the adapter's own rank, never the slot's maximum.
Rows of base-model requests are not touched at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.layers.linear import Linear
from kiln.lora.adapter import LayerDelta


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows [start, end) of the flat batch run adapter `slot` at `rank` (end None: to the last row)."""

    slot: int
    start: int
    end: int | None
    rank: int


class BatchSegments:
    """The segments of the forward now running, shared by every layer's slots (the manager sets it)."""

    __slots__ = ("segments",)

    def __init__(self) -> None:
        self.segments: tuple[Segment, ...] = ()


class LayerSlots:
    """The adapter slots of one Linear; calling it adds this batch's LoRA deltas to the layer's output."""

    def __init__(self, layer: Linear, max_loras: int, max_rank: int, batch: BatchSegments, dtype: torch.dtype,
                 device: torch.device) -> None:
        n = len(layer.shard_names)
        self.a = torch.zeros(max_loras, max_rank, n, layer.input_size, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, sum(layer.output_sizes), max_rank, dtype=dtype, device=device)
        self.rows = [layer.shard_slice(s) for s in layer.shard_names]
        self.shards: list[tuple[int, ...]] = [()] * max_loras  # per slot: the shards its adapter adapts
        self.batch = batch

    def load(self, slot: int, delta: LayerDelta | None) -> None:
        """Put one adapter's matrices for this layer into `slot` (None: the adapter leaves this layer alone)."""
        if delta is None:
            self.shards[slot] = ()
            return
        r = delta.a.shape[0]
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :r].copy_(delta.a)
        self.b[slot, :, :r].copy_(delta.b)
        self.shards[slot] = tuple(sorted(delta.shards))

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        segments = self.batch.segments
        if not segments:
            return y
        n = self.a.shape[2]
        for seg in segments:
            shards = self.shards[seg.slot]
            if not shards:
                continue
            xs, ys, r = x[seg.start:seg.end], y[seg.start:seg.end], seg.rank
            # [m, r * n]: rank-major, so shard j's columns are h[:, :, j] of the [m, r, n] view
            h = (xs @ self.a[seg.slot, :r].reshape(r * n, -1).T).view(-1, r, n)
            for j in shards:
                rows = self.rows[j]
                ys[:, rows].addmm_(h[:, :, j], self.b[seg.slot, rows, :r].T)
        return y

    def num_bytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

