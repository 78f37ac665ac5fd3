"""Physical KV-cache blocks, their free list and the prefix-cache hash map.

Invariants (checked by tests/core):
- A block is in the free queue iff its ``ref_cnt`` is 0, and at most once.
- ``ref_cnt`` equals the number of requests holding the block; never negative.
- Every hash-map entry ``h -> b`` has ``b.block_hash == h``. A block may carry
  a hash while free (that is what makes it a cache hit after its owner left);
  it loses the hash when it is popped for reuse.
- Free blocks are evicted LRU: ``free_blocks`` appends at the tail and
  ``get_new_blocks`` pops from the head, so callers that free a request
  tail-first keep its prefix blocks alive the longest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kiln.core.kv_cache_utils import BlockHash


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One physical block of KV cache. Identity, not value, equality (eq=False)."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # Intrusive links for FreeBlockQueue: no per-node allocation and O(1) remove
    # of an arbitrary block (a prefix hit on a free block), unlike a deque.
    prev_free_block: KVCacheBlock | None = None
    next_free_block: KVCacheBlock | None = None

    def __repr__(self) -> str:  # the links would recurse through the whole list
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly-linked list of free blocks; head = least recently freed.

    Two sentinel nodes remove every "is this the end?" branch from the ops.
    A block's links are None exactly when it is not in the queue.
    """

    __slots__ = ("_head", "_tail", "num_free_blocks")

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        """Remove and return the least recently freed block."""
        block = self._head.next_free_block
        if block is self._tail or block is None:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink ``block`` (which must be in the queue) in O(1)."""
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Insert ``block`` at the tail (most recently freed) in O(1)."""
        if block.prev_free_block is not None or block.next_free_block is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free_block
        assert last is not None
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self._tail
        self._tail.prev_free_block = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Head to tail. For tests and debugging; O(n)."""
        node = self._head.next_free_block
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free_block


class BlockPool:
    """Owns all blocks, the free queue and the hash -> block map.

    Pure bookkeeping: block ids index the KV tensors the model runner owns.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks: list[KVCacheBlock] = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        # Keyed by the full BlockHash, so a lookup also compares token ids.
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The block holding exactly these (final) tokens, if still cached."""
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop ``num_blocks`` LRU free blocks, evicting their cache entries.

        Raises ValueError (changing nothing) if fewer are free.
        """
        if num_blocks > self.free_block_queue.num_free_blocks:
            raise ValueError(
                f"cannot get {num_blocks} blocks: only "
                f"{self.free_block_queue.num_free_blocks} free"
            )
        out: list[KVCacheBlock] = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        # The block is about to be overwritten: its content is no longer the
        # hashed tokens, so its map entry must go before anyone can hit it.
        block_hash = block.block_hash
        if block_hash is None:
            return
        if self.cached_block_hash_to_block.get(block_hash) is block:
            del self.cached_block_hash_to_block[block_hash]
        block.block_hash = None

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Register ``block`` (full of final tokens) under ``block_hash``.

        If another block already holds this content, the first mapping wins and
        ``block`` stays un-hashed: a harmless duplicate that frees like any
        uncached block. No-op when caching is disabled.
        """
        if not self.enable_caching:
            return
        if block.block_hash is not None:
            raise ValueError(f"block {block.block_id} is already cached")
        if block_hash in self.cached_block_hash_to_block:
            return
        block.block_hash = block_hash
        self.cached_block_hash_to_block[block_hash] = block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one more reference on each block (a prefix-cache hit).

        A free block (ref_cnt 0) leaves the free queue so it cannot be evicted.
        """
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference on each block; newly free ones join the LRU tail
        in the given order (so pass a request's blocks tail-first)."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached-but-free = unused)."""
        return 1.0 - self.free_block_queue.num_free_blocks / self.num_blocks

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (False) while any block is in use,
        because a running request may still be registering hashes."""
        if self.free_block_queue.num_free_blocks != self.num_blocks:
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.block_hash = None
        return True
