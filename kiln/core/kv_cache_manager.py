"""Per-request KV-cache block tables on top of :class:`BlockPool`.

The scheduler uses three calls per request:

1. ``get_computed_blocks`` once, on the request's first schedule (again after a
   preemption): the longest cached prefix, without taking references.
2. ``allocate_slots`` every step it is scheduled (the first time with the hits
   from 1, called right after 1 so no other allocation can evict them).
3. ``free`` when it finishes, is aborted or is preempted.

Invariants:
- A request's blocks cover at least its ``num_computed_tokens`` (plus what was
  allocated for the current step).
- A hash is registered only for a full block whose tokens are all final
  (``< request.num_tokens``) and whose KV is written no later than the step
  that registers it: computed tokens, or this step's new tokens. The engine
  writes every token's KV of a step before any attention runs in each layer,
  so another request hitting the block within the same step reads valid KV.
  Lookahead (speculative draft) slots are never hashed.
- ``request.all_token_ids`` is append-only while the request is known here,
  which is what makes the incremental per-request hash list valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kiln.core.block_pool import BlockPool, KVCacheBlock
from kiln.core.kv_cache_utils import BlockHash, cdiv, hash_block_tokens

__all__ = ["BlockHash", "KVCacheManager", "KVCacheRequest", "hash_block_tokens"]


class KVCacheRequest(Protocol):
    """What the manager reads from a request (``cache_salt`` is optional)."""

    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int: ...


@dataclass(slots=True)
class _RequestBlocks:
    """Per-request state. ``num_cached_blocks``: leading blocks already hashed
    (or deliberately left as duplicates); hashing resumes from there."""

    blocks: list[KVCacheBlock] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_blocks: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._requests: dict[str, _RequestBlocks] = {}
        # Token-level stats: queried prompt tokens and how many were hits.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------

    def get_block_ids(self, request_id: str) -> list[int]:
        state = self._requests.get(request_id)
        return [] if state is None else [b.block_id for b in state.blocks]

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        """The request's block table (a copy)."""
        state = self._requests.get(request_id)
        return [] if state is None else list(state.blocks)

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    # ---- hashing ---------------------------------------------------------

    def _state(self, request: KVCacheRequest) -> _RequestBlocks:
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = _RequestBlocks()
        return state

    def _extend_hashes(self, request: KVCacheRequest, hashes: list[BlockHash], n: int) -> None:
        """Hash full blocks ``len(hashes) .. n-1`` of ``request.all_token_ids``.

        Incremental: each block is hashed once per request lifetime (a decode
        step hashes at most the block it just filled).
        """
        bs = self.block_size
        tokens = request.all_token_ids
        salt = getattr(request, "cache_salt", None)
        for i in range(len(hashes), n):
            parent = hashes[-1].hash_value if hashes else None
            hashes.append(
                hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs], salt if i == 0 else None)
            )

    # ---- the scheduler's three calls ------------------------------------

    def get_computed_blocks(self, request: KVCacheRequest) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks, capped below ``num_tokens``.

        The last token is always recomputed so the step still produces logits;
        hence at most ``(num_tokens - 1) // block_size`` blocks hit. Takes no
        references: pass the blocks to ``allocate_slots`` right away.
        """
        if not self.enable_caching:
            return [], 0
        state = self._state(request)
        num_tokens = request.num_tokens
        self._extend_hashes(request, state.block_hashes, num_tokens // self.block_size)
        max_hit_blocks = max(num_tokens - 1, 0) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in state.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break  # the chain is broken: later blocks cannot be valid hits
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self,
        request: KVCacheRequest,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Grow the request's block table for this step.

        Covers ``num_computed_tokens + hits + num_new_tokens +
        num_lookahead_tokens`` tokens. Returns the newly allocated blocks, or
        None without changing any state when the pool cannot supply them.
        """
        if num_new_tokens < 0 or num_lookahead_tokens < 0:
            raise ValueError("token counts must be non-negative")
        hit_blocks = new_computed_blocks or []
        existing = self._requests.get(request.request_id)
        held = existing.blocks if existing is not None else []
        if hit_blocks and held:
            raise ValueError("new_computed_blocks are only accepted on a request's first allocation")

        bs = self.block_size
        num_computed = request.num_computed_tokens + len(hit_blocks) * bs
        num_required = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, bs)
        num_new_blocks = max(num_required - len(held) - len(hit_blocks), 0)
        # Touching a free hit block takes it out of the free pool too.
        num_hits_in_free_pool = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_hits_in_free_pool > self.block_pool.get_num_free_blocks():
            return None

        state = existing if existing is not None else self._state(request)
        if hit_blocks:
            # Touch before allocating so get_new_blocks cannot evict a hit.
            self.block_pool.touch(hit_blocks)
            state.blocks.extend(hit_blocks)
            state.num_cached_blocks = len(hit_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        state.blocks.extend(new_blocks)

        if self.enable_caching:
            # Only final tokens; lookahead slots hold draft KV that may be rejected.
            num_final = min(num_computed + num_new_tokens, request.num_tokens)
            num_full = num_final // bs
            if num_full > state.num_cached_blocks:
                self._extend_hashes(request, state.block_hashes, num_full)
                for i in range(state.num_cached_blocks, num_full):
                    self.block_pool.cache_full_block(state.blocks[i], state.block_hashes[i])
                state.num_cached_blocks = num_full
        return new_blocks

    def free(self, request: KVCacheRequest) -> None:
        """Release the request's blocks tail-first and forget it (idempotent).

        Tail-first puts the prefix blocks at the LRU tail, so a shared prefix
        outlives the request-specific suffix that follows it.
        """
        state = self._requests.pop(request.request_id, None)
        if state is not None:
            self.block_pool.free_blocks(reversed(state.blocks))
