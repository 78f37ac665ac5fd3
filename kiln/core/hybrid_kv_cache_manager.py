"""KV-cache block tables for models with sliding-window layers: one table per layer group.

Same three calls as :class:`kiln.core.kv_cache_manager.KVCacheManager` (the scheduler cannot tell
them apart), over groups planned by kiln.core.kv_cache_groups:

- ``get_computed_blocks``: the longest prefix of whole blocks that every global group has cached
  *and* for which every sliding group still has the blocks the next query's window reaches
  (a prefix hit must have its window's blocks; the ones before it are not needed).
- ``allocate_slots``: first gives back each sliding group's blocks that every query from
  ``num_computed_tokens`` on has slid past (they keep their hashes, so they stay prefix-cache hits
  until evicted), then grows every table. This is the only state change made when the pool then
  turns out too small (None is returned): the freed blocks were dead either way.
- ``free``: everything, tail-first per group.

``get_block_ids`` returns one list per group; a freed position holds block id 0, which no attention
path reads (kiln.kernels.paged_attention reads a sliding layer's blocks from its window's first block
on; slots are written only for this step's tokens, which lie in live blocks).

Hashes are chained per group (the group's index salts its first block), so the same tokens cached
by two groups are two different cache entries; token ids are compared on every hit as in the
plain manager.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kiln.core.block_pool import BlockPool, KVCacheBlock
from kiln.core.kv_cache_groups import KVCacheGroup
from kiln.core.kv_cache_manager import KVCacheRequest
from kiln.core.kv_cache_utils import BlockHash, cdiv, hash_block_tokens

GroupBlocks = list[list[KVCacheBlock | None]]  # per group, per block position; None: freed / never needed


@dataclass(slots=True)
class _GroupTables:
    blocks: GroupBlocks
    hashes: list[list[BlockHash]]
    num_cached: list[int]  # per group: leading positions already registered (or skipped) for caching


@dataclass(slots=True)
class _Hits:
    """What get_computed_blocks found: `blocks` per group (None before a sliding group's window)."""

    blocks: GroupBlocks = field(default_factory=list)
    num_blocks: int = 0

    def __bool__(self) -> bool:
        return self.num_blocks > 0


class HybridKVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, groups: Sequence[KVCacheGroup],
                 enable_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.groups = list(groups)
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._requests: dict[str, _GroupTables] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------
    def get_block_ids(self, request_id: str) -> list[list[int]]:
        state = self._requests.get(request_id)
        if state is None:
            return [[] for _ in self.groups]
        return [[0 if b is None else b.block_id for b in table] for table in state.blocks]

    def num_blocks_held(self, request_id: str) -> int:
        """Live blocks this request holds across its groups (shared ones counted once per table)."""
        state = self._requests.get(request_id)
        return 0 if state is None else sum(b is not None for table in state.blocks for b in table)

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    # ---- helpers ---------------------------------------------------------
    def _state(self, request: KVCacheRequest) -> _GroupTables:
        state = self._requests.get(request.request_id)
        if state is None:
            n = len(self.groups)
            state = self._requests[request.request_id] = _GroupTables([[] for _ in range(n)], [[] for _ in range(n)],
                                                                      [0] * n)
        return state

    def _extend_hashes(self, request: KVCacheRequest, group: int, hashes: list[BlockHash], n: int) -> None:
        bs, tokens = self.block_size, request.all_token_ids
        salt = getattr(request, "cache_salt", None)
        for i in range(len(hashes), n):
            parent = hashes[-1].hash_value if hashes else None
            extra = (salt, "kv-group", group) if i == 0 and group else (salt if i == 0 else None)
            hashes.append(hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs], extra))

    def _first_needed(self, group: KVCacheGroup, num_computed: int) -> int:
        """First block position a query at `num_computed` (or later) can still attend to in `group`."""
        if group.window is None:
            return 0
        return max(num_computed - group.window + 1, 0) // self.block_size

    # ---- the scheduler's three calls ------------------------------------
    def get_computed_blocks(self, request: KVCacheRequest) -> tuple[_Hits, int]:
        """Longest usable cached prefix (whole blocks, below num_tokens); takes no references."""
        if not self.enable_caching:
            return _Hits(), 0
        state = self._state(request)
        n_full = request.num_tokens // self.block_size
        max_hit = max(request.num_tokens - 1, 0) // self.block_size
        found: GroupBlocks = []
        for g in range(len(self.groups)):
            self._extend_hashes(request, g, state.hashes[g], n_full)
            found.append([self.block_pool.get_cached_block(h) for h in state.hashes[g][:max_hit]])
        k = max_hit
        for g, group in enumerate(self.groups):
            if group.window is None:  # a global group needs every block before the hit point
                k = min(k, next((i for i, b in enumerate(found[g]) if b is None), len(found[g])))
        while k > 0 and not all(all(b is not None for b in found[g][self._first_needed(group, k * self.block_size):k])
                                for g, group in enumerate(self.groups) if group.window is not None):
            k -= 1
        hits = _Hits([[b if i >= self._first_needed(group, k * self.block_size) else None
                       for i, b in enumerate(found[g][:k])] for g, group in enumerate(self.groups)], k)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += k * self.block_size
        return hits, k * self.block_size

    def allocate_slots(self, request: KVCacheRequest, num_new_tokens: int, new_computed_blocks: _Hits | None = None,
                       num_lookahead_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Free what slid out of every window, then grow each group's table to cover
        ``num_computed_tokens + hits + num_new_tokens + num_lookahead_tokens``; None if the pool is short."""
        if num_new_tokens < 0 or num_lookahead_tokens < 0:
            raise ValueError("token counts must be non-negative")
        hits = new_computed_blocks or _Hits([[] for _ in self.groups], 0)
        existing = self._requests.get(request.request_id)
        if hits and existing is not None and any(existing.blocks):
            raise ValueError("new_computed_blocks are only accepted on a request's first allocation")
        bs = self.block_size
        num_computed = request.num_computed_tokens + hits.num_blocks * bs
        if existing is not None:
            self._free_out_of_window(existing, num_computed)
        required = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, bs)
        held = existing.blocks if existing is not None else [[] for _ in self.groups]
        new_per_group = [max(required - len(held[g]) - len(hits.blocks[g]), 0) for g in range(len(self.groups))]
        in_free_pool = sum(1 for table in hits.blocks for b in table if b is not None and b.ref_cnt == 0)
        if sum(new_per_group) + in_free_pool > self.block_pool.get_num_free_blocks():
            return None
        state = existing if existing is not None else self._state(request)
        if hits:
            for g, table in enumerate(hits.blocks):
                self.block_pool.touch([b for b in table if b is not None])
                state.blocks[g].extend(table)
                state.num_cached[g] = len(table)
        allocated: list[KVCacheBlock] = []
        for g, n in enumerate(new_per_group):
            new_blocks = self.block_pool.get_new_blocks(n)
            state.blocks[g].extend(new_blocks)
            allocated.extend(new_blocks)
        if self.enable_caching:
            num_full = min(num_computed + num_new_tokens, request.num_tokens) // bs
            for g in range(len(self.groups)):
                if num_full <= state.num_cached[g]:
                    continue
                self._extend_hashes(request, g, state.hashes[g], num_full)
                for i in range(state.num_cached[g], num_full):
                    block = state.blocks[g][i]
                    if block is not None and block.block_hash is None:
                        self.block_pool.cache_full_block(block, state.hashes[g][i])
                state.num_cached[g] = num_full
        return allocated

    def _free_out_of_window(self, state: _GroupTables, num_computed: int) -> None:
        for g, group in enumerate(self.groups):
            table = state.blocks[g]
            dead = [i for i in range(min(self._first_needed(group, num_computed), len(table))) if table[i] is not None]
            if not dead:
                continue
            # Newest first, so the older blocks are evicted first if the pool runs short.
            self.block_pool.free_blocks(table[i] for i in reversed(dead))
            for i in dead:
                table[i] = None

    def free(self, request: KVCacheRequest) -> None:
        """Release every block the request holds, tail-first per group, and forget it (idempotent)."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return
        for table in state.blocks:
            self.block_pool.free_blocks(b for b in reversed(table) if b is not None)
