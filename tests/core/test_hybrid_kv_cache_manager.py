"""The hybrid KV cache manager (no model): group planning, blocks given back as windows slide, prefix
hits that carry their window's blocks, and everything returned on free (preemption)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kiln.core.hybrid_kv_cache_manager import HybridKVCacheManager
from kiln.core.kv_cache_groups import KVCacheGroup, max_tokens_per_sequence, plan_kv_groups

BS, W = 4, 10


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    spec: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def test_gemma3_layout_is_six_groups_of_three() -> None:
    windows = tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))
    groups = plan_kv_groups(windows, 18)
    assert [g.window for g in groups] == [None] + [512] * 5
    assert groups[0].layers == (5, 11, 17)
    assert sorted(layer for g in groups for layer in g.layers) == list(range(18))
    assert plan_kv_groups((), 4) == [KVCacheGroup(None, (0, 1, 2, 3))]
    assert plan_kv_groups(windows, 18, hybrid=False) == [KVCacheGroup(None, tuple(range(18)))]
    assert plan_kv_groups((7, 7), 2) == [KVCacheGroup(7, (0, 1))]  # Mistral: every layer slides


def _groups() -> list[KVCacheGroup]:
    return [KVCacheGroup(None, (1,)), KVCacheGroup(W, (0,))]


def _decode(mgr: HybridKVCacheManager, req: Req, steps: int) -> int:
    """Append and compute one token per step; return the most blocks ever in use."""
    peak = 0
    for _ in range(steps):
        assert mgr.allocate_slots(req, req.num_tokens - req.num_computed_tokens) is not None
        req.num_computed_tokens = req.num_tokens
        req.all_token_ids.append(len(req.all_token_ids) % 97)
        peak = max(peak, mgr.num_blocks - mgr.get_num_free_blocks())
    return peak


def test_local_blocks_are_freed_as_the_window_slides() -> None:
    mgr = HybridKVCacheManager(200, BS, _groups())
    req = Req("a", list(range(5)))
    peak = _decode(mgr, req, 300)
    local_bound = -(-W // BS) + 1 + 1  # the window's blocks, one split by a boundary, this step's token
    assert peak <= -(-req.num_tokens // BS) + local_bound
    ids = mgr.get_block_ids("a")
    live_local = [i for i, b in enumerate(mgr._requests["a"].blocks[1]) if b is not None]
    # Exactly the blocks the next query (at num_computed) can see are live.
    first = (req.num_computed_tokens - W + 1) // BS
    assert live_local == list(range(first, len(ids[1])))
    assert len(ids[0]) == len(ids[1]) == -(-req.num_computed_tokens // BS)
    mgr.free(req)
    assert mgr.get_num_free_blocks() == 200


def test_a_prefix_hit_carries_its_window() -> None:
    mgr = HybridKVCacheManager(200, BS, _groups())
    first = Req("a", list(range(60)))
    assert mgr.allocate_slots(first, 60) is not None
    first.num_computed_tokens = 60
    global_ids = mgr.get_block_ids("a")[0]
    mgr.free(first)
    again = Req("b", list(range(60)) + [5, 6, 7])
    hits, n = mgr.get_computed_blocks(again)
    assert n == 60  # all 15 blocks: the global group has them all, the local one the window's
    first_needed = (60 - W + 1) // BS
    assert all(b is None for b in hits.blocks[1][:first_needed])
    assert all(b is not None for b in hits.blocks[1][first_needed:]) and all(b is not None for b in hits.blocks[0])
    assert mgr.allocate_slots(again, 3, hits) is not None
    assert mgr.get_block_ids("b")[0][:15] == global_ids
    assert mgr.prefix_cache_hits == 60


def test_a_hit_without_its_window_is_shortened() -> None:
    mgr = HybridKVCacheManager(200, BS, _groups())
    first = Req("a", list(range(40)))
    assert mgr.allocate_slots(first, 40) is not None
    first.num_computed_tokens = 40
    local = mgr._requests["a"].blocks[1]
    evicted = local[8]  # the local block holding tokens 32..35
    mgr.free(first)
    mgr.block_pool._evict(evicted)  # as if reused by another request
    hits, n = mgr.get_computed_blocks(Req("b", list(range(40)) + [1]))
    # A hit of 40 or 36 tokens would need local block 8 in its window: the hit falls back to 32 tokens,
    # whose window (tokens 23..31) is still cached.
    assert n == 32 and hits.blocks[1][-1] is not None


def test_hashes_are_per_group() -> None:
    mgr = HybridKVCacheManager(64, BS, _groups())
    req = Req("a", list(range(16)))
    assert mgr.allocate_slots(req, 16) is not None
    tables = mgr._requests["a"].blocks
    assert all(g.block_hash != l.block_hash for g, l in zip(tables[0], tables[1]))


def test_the_longest_sequence_accounts_for_windows_and_chunks() -> None:
    assert max_tokens_per_sequence(_groups(), 100, BS, 8) == (100 - (3 + 1 + 2)) * BS
    with pytest.raises(ValueError):
        HybridKVCacheManager(8, BS, _groups()).allocate_slots(Req("a", [1]), -1)
