"""The prefix router's memory (kiln/entrypoints/replicas/prefix_index.py) against kiln's real prefix cache, and the
router's choice between a prefix holder and the least-loaded replica.

Reference: one real KVCacheManager per "replica" (the cache each engine keeps). Multi-turn chats are
sent to the replica the index picks; for every request the index's claimed leading match must equal
the blocks the replica's own cache then hits (capped as the cache caps a hit: the last prompt token is
always recomputed), as long as nothing was evicted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kiln.core.kv_cache_manager import KVCacheManager
from kiln.entrypoints.replicas.prefix_index import PrefixIndex, block_hashes

BS = 4


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    cache_salt: str | None = field(default=None)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def run_on(mgr: KVCacheManager, rid: str, tokens: list[int]) -> int:
    """Prefill `tokens` on the replica's cache as the scheduler would; returns the blocks it hit."""
    req = Req(rid, tokens)
    hits, _ = mgr.get_computed_blocks(req)
    assert mgr.allocate_slots(req, req.num_tokens - len(hits) * BS, hits) is not None
    mgr.free(req)
    return len(hits)


def test_index_claims_exactly_what_the_replica_cache_hits_on_multi_turn_chats() -> None:
    rng = random.Random(0)
    replicas = {name: KVCacheManager(num_blocks=4096, block_size=BS) for name in ("a", "b")}
    index = PrefixIndex()
    system = [rng.randrange(1000) for _ in range(10)]  # a shared system prompt (2 full blocks + 2)
    chats = {c: list(system) for c in range(12)}
    claimed_total = 0
    for turn in range(5):
        for c, history in chats.items():
            history.extend(rng.randrange(1000) for _ in range(rng.randrange(1, 9)))  # the user's turn
            hashes = block_hashes(history, BS)
            holder, matched = index.best(list(replicas), hashes)
            target = holder or ("a" if c % 2 else "b")  # a new chat goes anywhere
            claimed = min(index.match(target, hashes), (len(history) - 1) // BS)
            hit = run_on(replicas[target], f"{c}-{turn}", history)
            assert hit == claimed, (c, turn, target, hit, claimed)
            claimed_total += claimed
            index.record(target, hashes)
            history.extend(rng.randrange(1000) for _ in range(rng.randrange(1, 9)))  # the reply
    assert claimed_total > 0  # the chats did come back to the replica holding them


def test_match_counts_leading_blocks_only_and_capacity_evicts_least_recent() -> None:
    index = PrefixIndex(default_capacity=3)
    a = block_hashes(list(range(12)), BS)  # 3 blocks
    b = block_hashes(list(range(100, 108)), BS)  # 2 other blocks
    index.record("r", a)
    assert index.match("r", a) == 3
    assert index.match("r", [a[0], 12345, a[2]]) == 1  # a broken chain stops the match
    index.record("r", b)  # 5 hashes into a capacity of 3: a[0], a[1] go
    assert index.size("r") == 3
    assert index.match("r", a) == 0 and index.match("r", b) == 2
    index.set_capacity("r", 1)
    assert index.size("r") == 1
    index.drop("r")
    assert index.best(["r"], b) == (None, 0)


def test_block_hashes_chain_full_blocks_only() -> None:
    assert block_hashes([1, 2, 3], BS) == []
    one = block_hashes([1, 2, 3, 4, 5], BS)
    assert len(one) == 1 and one == block_hashes([1, 2, 3, 4], BS)
    # the same block after a different prefix is a different hash (the cache keys on the chain)
    assert block_hashes([9, 9, 9, 9, 1, 2, 3, 4], BS)[1] != one[0]


# ---- the router's decision (Ray Serve's RequestRouter API, without a cluster) ----------------------
class FakeReplica:
    def __init__(self, name: str, blocks: int = 4096) -> None:
        self.replica_id = name
        self.routing_stats = {"num_blocks": blocks}


class FakePending:
    def __init__(self, token_ids: list[int]) -> None:
        from kiln.engine.request_validation import TokenizedPrompt

        self.args = [TokenizedPrompt(None, token_ids)]
        self.kwargs: dict = {}


def make_router(imbalance: int = 2):
    from ray.serve._private.request_router.common import ReplicaQueueLengthCache

    from kiln.entrypoints.replicas.prefix_router import PrefixAffinityRouter

    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # no cluster: only the routing state
    router._replica_queue_len_cache = ReplicaQueueLengthCache()
    router.initialize_state(block_size=BS, imbalance=imbalance)
    return router


def choose(router, replicas, tokens):
    import asyncio

    return asyncio.run(router.choose_replicas(replicas, FakePending(tokens)))


def test_router_prefers_the_holder_within_the_imbalance_else_the_least_loaded() -> None:
    router = make_router(imbalance=2)
    a, b = FakeReplica("a"), FakeReplica("b")
    prompt = list(range(20))
    # nobody holds it: one group of all replicas, least loaded first (Ray then probes queue lengths)
    router.in_flight = {"a": 3, "b": 1}
    assert [[r.replica_id for r in g] for g in choose(router, [a, b], prompt)] == [["b", "a"]]
    router.on_request_routed(FakePending(prompt), "a", None)  # a got it: a holds its blocks now
    assert router.in_flight["a"] == 4
    router.in_flight = {"a": 3, "b": 1}
    assert [[r.replica_id for r in g] for g in choose(router, [a, b], prompt + [7, 7])] == [["a"], ["b"]]
    router.in_flight = {"a": 4, "b": 1}  # the holder is 3 busier: more than the imbalance allows
    assert [[r.replica_id for r in g] for g in choose(router, [a, b], prompt)] == [["b", "a"]]
    router.replica_queue_len_cache.update("a", 0)  # Ray's probed queue length wins over the own count
    assert [[r.replica_id for r in g] for g in choose(router, [a, b], prompt)] == [["a"], ["b"]]
    assert router.decisions == {"prefix": 2, "least_loaded": 2}
    router._forget("a")  # a died: its successor starts cold
    assert router.index.best(["a", "b"], block_hashes(prompt, BS)) == (None, 0)
