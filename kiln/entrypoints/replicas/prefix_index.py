"""Which replica probably holds which prompt prefix in its prefix cache (the router's memory).

A replica's prefix cache keeps full KV blocks of `block_size` tokens, keyed by a chained hash
(parent block's hash + this block's token ids), and evicts the least recently used free block
first (kiln/core/kv_cache_manager.py). This index mirrors that from the router's side, without
asking the replicas: every prompt routed to a replica is recorded as the chain of its full blocks,
and each replica's record is an LRU capped at that replica's pool size in blocks. So a prefix the
index credits to a replica was sent there recently enough that it is likely still cached.

Invariants: a replica's record never holds more than its capacity in block hashes; `match` counts
leading blocks only (block i is useful only if blocks 0..i-1 are, exactly as the cache matches).
Pure Python, no Ray: tests/replicas/test_prefix_index.py checks it against kiln's own block
hashing of a real KVCacheManager.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

DEFAULT_CAPACITY_BLOCKS = 4096


def block_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int = 512) -> list[int]:
    """The chained hashes of the prompt's full blocks (at most `max_blocks`, from the start).

    Only full blocks are hashed, as the prefix cache does: a partial last block is never shared."""
    out: list[int] = []
    parent = 0
    for start in range(0, min(len(token_ids) // block_size, max_blocks) * block_size, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        out.append(parent)
    return out


class PrefixIndex:
    """Per-replica LRU records of block hashes; `best` finds the replica with the longest match."""

    def __init__(self, default_capacity: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        self.default_capacity = default_capacity
        self._records: dict[Hashable, OrderedDict[int, None]] = {}
        self._capacity: dict[Hashable, int] = {}

    def set_capacity(self, replica: Hashable, blocks: int) -> None:
        """The replica's KV pool size in blocks (what it reports); trims its record to fit."""
        self._capacity[replica] = max(1, int(blocks))
        self._trim(replica)

    def record(self, replica: Hashable, hashes: Iterable[int]) -> None:
        """The replica was sent a prompt with these blocks: they are now its most recently used."""
        rec = self._records.setdefault(replica, OrderedDict())
        for h in hashes:
            rec[h] = None
            rec.move_to_end(h)
        self._trim(replica)

    def match(self, replica: Hashable, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the replica probably holds."""
        rec = self._records.get(replica)
        if not rec:
            return 0
        n = 0
        for h in hashes:
            if h not in rec:
                break
            n += 1
        return n

    def best(self, replicas: Iterable[Hashable], hashes: Sequence[int]) -> tuple[Hashable | None, int]:
        """The replica (of `replicas`) with the longest leading match, and its length in blocks;
        (None, 0) when none holds even the first block. Ties go to the first in `replicas`."""
        best, longest = None, 0
        for r in replicas:
            m = self.match(r, hashes)
            if m > longest:
                best, longest = r, m
        return best, longest

    def drop(self, replica: Hashable) -> None:
        """Forget a replica (it died: a restarted one starts with an empty cache)."""
        self._records.pop(replica, None)
        self._capacity.pop(replica, None)

    def size(self, replica: Hashable) -> int:
        return len(self._records.get(replica, ()))

    def _trim(self, replica: Hashable) -> None:
        rec = self._records.get(replica)
        if rec is None:
            return
        cap = self._capacity.get(replica, self.default_capacity)
        while len(rec) > cap:
            rec.popitem(last=False)
