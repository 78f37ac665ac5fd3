"""Block hashing for the prefix cache.

A block's identity in the prefix cache is a :class:`BlockHash`: a chained hash
value plus the block's own token ids and an optional extra key. The hash value
of block ``i`` covers the hash value of block ``i - 1``, so equal hash values
mean "same tokens *and* (with overwhelming probability) same prefix".

Hash function: Python's built-in ``hash`` of a tuple. It is fast (no bytes
conversion) and stable within a process, which is all the prefix cache needs:
the cache lives in one process and never persists. Ints hash deterministically;
a ``str`` extra key is salted per process, which is fine for the same reason.

Collisions: two different blocks that happen to share a hash value never hit,
because :class:`BlockHash` equality also compares token ids and the extra key.
What remains is a collision of the *parent* chain with identical block tokens,
a 2**-64-ish event that an attacker cannot aim without knowing the victim's
prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Seed for the first block's "parent", so a one-block prompt still gets a
# chained value of the same shape as every later block.
_ROOT_PARENT_HASH = 0x6B696C6E  # "kiln"

# Indirection so tests can force collisions (monkeypatch this to a constant).
_hash_fn: Callable[[object], int] = hash


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


@dataclass(frozen=True, slots=True, eq=False)
class BlockHash:
    """Key of a full, final block in the prefix cache.

    Invariants:
    - ``hash_value`` is ``hash_block_tokens``' chained value; it alone decides
      ``__hash__`` so dict lookups never re-hash the token tuple.
    - Equality compares ``hash_value``, ``token_ids`` and ``extra_key``: a hash
      collision between different token contents is never a cache hit.
    """

    hash_value: int
    token_ids: tuple[int, ...]
    extra_key: object | None = None

    def __hash__(self) -> int:
        return self.hash_value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockHash):
            return NotImplemented
        # Cheap int compare first; tuple compare only on a (near-certain) match.
        return (
            self.hash_value == other.hash_value
            and self.token_ids == other.token_ids
            and self.extra_key == other.extra_key
        )


def hash_block_tokens(
    parent_hash_value: int | None,
    token_ids: Sequence[int],
    extra_key: object | None = None,
) -> BlockHash:
    """Hash one full block, chained on its parent's hash value.

    ``parent_hash_value`` is None for the first block of a sequence. The
    ``extra_key`` (a cache salt such as a KV dtype or LoRA id) only needs to be
    given for the first block: the chain carries it into every later value.
    """
    parent = _ROOT_PARENT_HASH if parent_hash_value is None else parent_hash_value
    tokens = tuple(token_ids)
    return BlockHash(_hash_fn((parent, tokens, extra_key)), tokens, extra_key)
