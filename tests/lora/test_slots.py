"""The batched LoRA delta of one fused layer (kiln.lora.slots) against a per-row plain-torch twin:
segments of different adapters, ranks below the slot's maximum, shard subsets, base rows untouched."""

from __future__ import annotations

import torch

from kiln.layers.linear import Linear
from kiln.lora.adapter import LayerDelta
from kiln.lora.slots import BatchSegments, LayerSlots, Segment


def _delta(rank: int, shards: set[int], gen: torch.Generator) -> LayerDelta:
    a = torch.randn(rank, 3, 16, generator=gen)
    b = torch.randn(16, rank, generator=gen)
    rows = [slice(0, 8), slice(8, 12), slice(12, 16)]
    for j in range(3):
        if j not in shards:  # what kiln.lora.adapter leaves for a shard the adapter does not adapt
            a[:, j] = 0
            b[rows[j]] = 0
    return LayerDelta(a, b, frozenset(shards))


def _reference(x: torch.Tensor, delta: LayerDelta) -> torch.Tensor:
    """Each shard's delta row by row: B_j (A_j x)."""
    rows = [slice(0, 8), slice(8, 12), slice(12, 16)]
    out = torch.zeros(x.shape[0], 16, dtype=torch.float64)
    for j in delta.shards:
        a, b = delta.a[:, j].double(), delta.b[rows[j]].double()
        for r in range(x.shape[0]):
            out[r, rows[j]] = b @ (a @ x[r].double())
    return out


def test_segments_add_each_adapters_delta_to_its_rows_only() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = Linear(16, [8, 4, 4], ["q", "k", "v"])
    batch = BatchSegments()
    slots = LayerSlots(layer, max_loras=3, max_rank=4, batch=batch, dtype=torch.float32, device=torch.device("cpu"))
    deltas = {0: _delta(4, {0, 1, 2}, gen), 2: _delta(2, {0, 2}, gen)}  # slot 1 stays empty
    for slot, delta in deltas.items():
        slots.load(slot, delta)
    x = torch.randn(10, 16, generator=gen)
    base = torch.randn(10, 16, generator=gen)
    batch.segments = (Segment(2, 0, 3, 2), Segment(0, 3, 4, 4), Segment(2, 6, 10, 2))  # rows 4, 5: base model
    y = slots(base.clone(), x)
    want = base.double().clone()
    want[0:3] += _reference(x[0:3], deltas[2])
    want[3:4] += _reference(x[3:4], deltas[0])
    want[6:10] += _reference(x[6:10], deltas[2])
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[4:6], base[4:6])
    batch.segments = ()
    assert torch.equal(slots(base.clone(), x), base)  # no segments: the layer's own output, untouched


def test_reloading_a_slot_with_a_smaller_rank_leaves_no_trace_of_the_old_adapter() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = Linear(16, [8, 4, 4], ["q", "k", "v"])
    batch = BatchSegments()
    slots = LayerSlots(layer, max_loras=1, max_rank=4, batch=batch, dtype=torch.float32, device=torch.device("cpu"))
    slots.load(0, _delta(4, {0, 1, 2}, gen))
    small = _delta(1, {1}, gen)
    slots.load(0, small)
    x = torch.randn(5, 16, generator=gen)
    batch.segments = (Segment(0, 0, None, 1),)
    torch.testing.assert_close(slots(torch.zeros(5, 16), x).double(), _reference(x, small), atol=1e-5, rtol=1e-5)
