"""How a model's layers share the KV block pool when some of them attend through a sliding window.

A *group* is a set of layers that share one block table per request. All groups draw from one
`BlockPool`; a block id names one page of `layers_per_block` layers' K/V (the i-th layer of every
group stores its K/V in the i-th page tensor, at the group's block ids), so a block costs the same
whichever group holds it. Global groups keep a block for every token; sliding-window groups give
back blocks that every query to come has slid past (kiln.core.hybrid_kv_cache_manager).

Gemma 3 270M (15 local layers with window 512, 3 global): six groups of three layers, one global,
five local; a 4,000-token sequence then holds 250 + 5 x 33 blocks of three layers instead of
6 x 250. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers sharing one block table. `window`: keys a query sees (itself included); None = all."""

    window: int | None
    layers: tuple[int, ...]


def plan_kv_groups(layer_windows: tuple[int | None, ...], num_layers: int,
                   hybrid: bool = True) -> list[KVCacheGroup]:
    """Equal-sized groups, each of one window kind. Without windows (or with `hybrid` False and
    several kinds): one group of every layer with no window, which is kiln's plain paged cache.

    Invariants: every layer is in exactly one group; all groups have the same size."""
    windows = layer_windows or (None,) * num_layers
    kinds: dict[int | None, list[int]] = {}
    for layer, window in enumerate(windows):
        kinds.setdefault(window, []).append(layer)
    if len(kinds) == 1:
        (window, layers), = kinds.items()
        return [KVCacheGroup(window, tuple(layers))]
    if not hybrid:
        return [KVCacheGroup(None, tuple(range(num_layers)))]
    size = 0
    for layers in kinds.values():
        size = gcd(size, len(layers))
    # Global groups first: their tables are the long ones.
    ordered = sorted(kinds.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))
    return [KVCacheGroup(window, tuple(layers[i:i + size]))
            for window, layers in ordered for i in range(0, len(layers), size)]


def layers_per_block(groups: list[KVCacheGroup]) -> int:
    """Layers whose K/V one pool block holds (every group has this many)."""
    return len(groups[0].layers)


def max_tokens_per_sequence(groups: list[KVCacheGroup], num_blocks: int, block_size: int, chunk_tokens: int) -> int:
    """The longest sequence the pool can hold alone: a local group holds at most a window's blocks
    (plus the one a block boundary splits) and the blocks of one step's `chunk_tokens` new tokens;
    a global group holds a block per `block_size` tokens."""
    local = sum(-(-g.window // block_size) + 1 + -(-chunk_tokens // block_size) for g in groups if g.window is not None)
    full = sum(1 for g in groups if g.window is None)
    if full == 0:
        return 1 << 62  # every layer slides: any length fits once a window's blocks do
    return max(num_blocks - local, 0) // full * block_size
