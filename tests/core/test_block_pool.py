"""FreeBlockQueue and BlockPool: ordering, ref counts, eviction."""

from __future__ import annotations

import pytest

from kiln.core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from kiln.core.kv_cache_utils import BlockHash, hash_block_tokens


def ids(blocks: object) -> list[int]:
    return [b.block_id for b in blocks]  # type: ignore[attr-defined]


# ---- FreeBlockQueue ------------------------------------------------------


def test_queue_starts_in_id_order_and_pops_fifo() -> None:
    blocks = [KVCacheBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    assert q.num_free_blocks == len(q) == 4
    assert ids(q) == [0, 1, 2, 3]
    assert q.popleft() is blocks[0]
    assert q.popleft() is blocks[1]
    assert ids(q) == [2, 3] and q.num_free_blocks == 2


def test_queue_remove_head_middle_tail_and_append() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.remove(blocks[0])
    q.remove(blocks[4])
    assert ids(q) == [1, 3] and q.num_free_blocks == 2
    assert blocks[2].prev_free_block is None and blocks[2].next_free_block is None
    q.append(blocks[4])
    q.append(blocks[0])
    assert ids(q) == [1, 3, 4, 0]
    assert [q.popleft().block_id for _ in range(4)] == [1, 3, 4, 0]
    assert q.num_free_blocks == 0


def test_queue_errors() -> None:
    blocks = [KVCacheBlock(i) for i in range(2)]
    q = FreeBlockQueue(blocks)
    with pytest.raises(ValueError):
        q.append(blocks[0])  # already queued
    q.popleft()
    q.popleft()
    with pytest.raises(ValueError):
        q.popleft()
    with pytest.raises(ValueError):
        q.remove(blocks[0])  # not queued


def test_block_repr_does_not_recurse() -> None:
    blocks = [KVCacheBlock(i) for i in range(3)]
    FreeBlockQueue(blocks)
    assert "id=1" in repr(blocks[1])


# ---- BlockPool -----------------------------------------------------------


def _hash(tokens: list[int], parent: int | None = None) -> BlockHash:
    return hash_block_tokens(parent, tokens)


def test_alloc_sets_ref_and_raises_when_short() -> None:
    pool = BlockPool(4)
    got = pool.get_new_blocks(3)
    assert ids(got) == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in got)
    assert pool.get_num_free_blocks() == 1
    assert pool.usage == pytest.approx(0.75)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert pool.get_num_free_blocks() == 1  # unchanged by the failed call


def test_free_and_touch_ref_counts() -> None:
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a, b])
    assert a.ref_cnt == 1 and b.ref_cnt == 0
    assert ids(pool.free_block_queue) == [2, 1]
    pool.touch([b])  # touching a free block pulls it out of the queue
    assert b.ref_cnt == 1 and ids(pool.free_block_queue) == [2]
    pool.free_blocks([a, b])
    with pytest.raises(ValueError):
        pool.free_blocks([a])  # double free
    assert pool.get_num_free_blocks() == 3 and pool.usage == 0.0


def test_cached_block_survives_free_and_is_evicted_on_reuse() -> None:
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    h = _hash([1, 2])
    pool.cache_full_block(a, h)
    pool.free_blocks([a])
    assert pool.get_cached_block(h) is a  # free but still a hit
    pool.get_new_blocks(1)  # pops block 1 (LRU head), a stays cached
    assert pool.get_cached_block(h) is a
    (again,) = pool.get_new_blocks(1)
    assert again is a and a.block_hash is None
    assert pool.get_cached_block(h) is None


def test_duplicate_hash_keeps_first_mapping() -> None:
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    h = _hash([7, 7])
    pool.cache_full_block(a, h)
    pool.cache_full_block(b, _hash([7, 7]))
    assert pool.get_cached_block(h) is a and b.block_hash is None
    with pytest.raises(ValueError):
        pool.cache_full_block(a, _hash([8, 8]))


def test_lookup_compares_token_ids_not_only_hash_value() -> None:
    pool = BlockPool(1)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_block(a, BlockHash(42, (1, 2)))
    assert pool.get_cached_block(BlockHash(42, (1, 2))) is a
    assert pool.get_cached_block(BlockHash(42, (3, 4))) is None
    assert pool.get_cached_block(BlockHash(42, (1, 2), extra_key="fp8")) is None


def test_lru_evicts_last_block_of_request_first() -> None:
    pool = BlockPool(4)
    req = pool.get_new_blocks(3)
    for i, blk in enumerate(req):
        pool.cache_full_block(blk, _hash([i, i]))
    pool.free_blocks(reversed(req))  # tail-first, as KVCacheManager.free does
    # Never-used block 3 goes first, then the request's tail, its head last.
    assert ids(pool.get_new_blocks(4)) == [3, 2, 1, 0]


def test_caching_disabled_never_maps() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_block(a, _hash([1]))
    assert a.block_hash is None and pool.get_cached_block(_hash([1])) is None


def test_reset_prefix_cache_only_when_idle() -> None:
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    h = _hash([5])
    pool.cache_full_block(a, h)
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(h) is a
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h) is None and a.block_hash is None


def test_invalid_num_blocks() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)
