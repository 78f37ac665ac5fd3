"""KVCacheManager: prefix hits, allocation, freeing, and a stateful model check."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kiln.core import kv_cache_utils
from kiln.core.kv_cache_manager import KVCacheManager, hash_block_tokens
from kiln.core.kv_cache_utils import cdiv


@dataclass(slots=True)
class Req:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    cache_salt: object | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def run_prefill(mgr: KVCacheManager, req: Req, lookahead: int = 0) -> list[int]:
    """First schedule of a whole prompt in one step; returns its block ids."""
    hits, n_hit = mgr.get_computed_blocks(req)
    assert mgr.allocate_slots(req, req.num_tokens - n_hit, hits, lookahead) is not None
    req.num_computed_tokens = req.num_tokens
    return mgr.get_block_ids(req.request_id)


SYS = list(range(100, 108))  # a two-block "system prompt" at block_size 4


def test_shared_system_prompt_hits_and_shares_blocks() -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    a, b = Req("a", SYS + [1, 2, 3]), Req("b", SYS + [7, 8, 9, 10, 11])
    a_ids = run_prefill(mgr, a)
    hits, n_hit = mgr.get_computed_blocks(b)
    assert n_hit == 8 and [h.block_id for h in hits] == a_ids[:2]
    new = mgr.allocate_slots(b, b.num_tokens - n_hit, hits)
    assert new is not None and len(new) == 2
    assert mgr.get_block_ids("b")[:2] == a_ids[:2]
    assert [blk.ref_cnt for blk in hits] == [2, 2]
    assert (mgr.prefix_cache_queries, mgr.prefix_cache_hits) == (11 + 13, 8)


@pytest.mark.parametrize(("extra", "want_hit"), [([], 4), ([5], 8)])
def test_full_prompt_hit_still_recomputes_last_token(extra: list[int], want_hit: int) -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    run_prefill(mgr, Req("a", SYS))
    _, n_hit = mgr.get_computed_blocks(Req("b", SYS + extra))
    assert n_hit == want_hit  # exactly 2 blocks cached -> only 1 may hit


def test_hash_collision_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache_utils, "_hash_fn", lambda _: 0)  # every block collides
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    run_prefill(mgr, Req("a", [1, 2, 3, 4, 9, 9, 9, 9, 0]))
    # Block 0 differs; block 1 would be an equal BlockHash, but the chain stops.
    assert mgr.get_computed_blocks(Req("b", [5, 6, 7, 8, 9, 9, 9, 9, 0])) == ([], 0)
    _, n_hit = mgr.get_computed_blocks(Req("c", [1, 2, 3, 4, 9, 9, 9, 9, 0]))
    assert n_hit == 8  # identical tokens still hit under a degenerate hash


def test_cache_salt_separates_caches() -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    run_prefill(mgr, Req("a", SYS + [1], cache_salt="fp8"))
    assert mgr.get_computed_blocks(Req("b", SYS + [1]))[1] == 0
    assert mgr.get_computed_blocks(Req("c", SYS + [1], cache_salt="fp8"))[1] == 8


def _snapshot(mgr: KVCacheManager, rids: list[str]) -> object:
    pool = mgr.block_pool
    return (
        [b.block_id for b in pool.free_block_queue],
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        {h: b.block_id for h, b in pool.cached_block_hash_to_block.items()},
        {r: mgr.get_block_ids(r) for r in rids},
    )


def test_out_of_blocks_returns_none_and_changes_nothing() -> None:
    mgr = KVCacheManager(num_blocks=3, block_size=4)
    a = Req("a", SYS)
    run_prefill(mgr, a)
    mgr.free(a)  # 2 cached blocks, now free
    b = Req("b", SYS + list(range(8)))  # 16 tokens = 4 blocks; 2 of them hit
    hits, n_hit = mgr.get_computed_blocks(b)
    assert n_hit == 8
    before = _snapshot(mgr, ["b"])
    # 2 new blocks <= 3 free, but touching the 2 free hits leaves only 1.
    assert mgr.allocate_slots(b, 8, hits) is None
    assert _snapshot(mgr, ["b"]) == before
    assert mgr.allocate_slots(b, 4, hits) is not None  # 3 blocks fit exactly
    assert mgr.get_num_free_blocks() == 0 and mgr.usage == 1.0


def test_lookahead_slots_are_never_hashed() -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    r = Req("r", [1, 2, 3, 4, 5, 6])
    run_prefill(mgr, r, lookahead=2)  # tokens 4..7 fill block 1, 6..7 are drafts
    blocks = mgr.get_blocks("r")
    assert blocks[0].block_hash is not None and blocks[1].block_hash is None
    r.all_token_ids.append(7)  # decode: one final token + 3 draft slots
    assert mgr.allocate_slots(r, 1, None, num_lookahead_tokens=3) is not None
    r.num_computed_tokens += 1
    assert len(mgr.get_blocks("r")) == 3 and blocks[1].block_hash is None
    r.all_token_ids.append(8)  # the block's last token becomes final and computed
    assert mgr.allocate_slots(r, 1) == []
    assert blocks[1].block_hash is not None


def test_chunked_prefill_hashes_only_computed_blocks() -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    r = Req("r", list(range(12)))
    mgr.allocate_slots(r, 5)
    r.num_computed_tokens = 5
    assert [b.block_hash is not None for b in mgr.get_blocks("r")] == [True, False]
    mgr.allocate_slots(r, 7)
    assert all(b.block_hash is not None for b in mgr.get_blocks("r"))


def test_hit_after_owner_preempted_reuses_blocks() -> None:
    mgr = KVCacheManager(num_blocks=6, block_size=4)
    a = Req("a", SYS + [1, 2])
    ids = run_prefill(mgr, a)
    mgr.free(a)
    a.num_computed_tokens = 0  # preemption = recompute
    assert mgr.get_num_free_blocks() == 6
    hits, n_hit = mgr.get_computed_blocks(a)
    assert n_hit == 8 and [h.ref_cnt for h in hits] == [0, 0]
    new = mgr.allocate_slots(a, a.num_tokens - n_hit, hits)
    assert new is not None and len(new) == 1
    assert mgr.get_block_ids("a")[:2] == ids[:2]
    assert [h.ref_cnt for h in hits] == [1, 1] and mgr.get_num_free_blocks() == 3


def test_free_is_tail_first_so_prefix_outlives_suffix() -> None:
    mgr = KVCacheManager(num_blocks=3, block_size=4)
    a = Req("a", SYS + [1, 2, 3])
    ids = run_prefill(mgr, a)
    mgr.free(a)
    assert mgr.allocate_slots(Req("x", []), 4) is not None  # evicts a's last block
    assert mgr.get_block_ids("x") == [ids[2]]
    assert mgr.get_computed_blocks(Req("b", SYS + [9]))[1] == 8  # prefix survived


def test_same_step_sharing() -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=4)
    a, b = Req("a", SYS + [1]), Req("b", SYS + [2])
    hits, _ = mgr.get_computed_blocks(a)
    mgr.allocate_slots(a, a.num_tokens, hits)  # a's num_computed not yet advanced
    hits, n_hit = mgr.get_computed_blocks(b)
    assert n_hit == 8 and [h.block_id for h in hits] == mgr.get_block_ids("a")[:2]


def test_free_aborted_mid_prefill_and_idempotent() -> None:
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    run_prefill(mgr, Req("a", SYS + [1]))
    mgr.free(Req("a", []))
    b = Req("b", SYS + list(range(12)))
    hits, n_hit = mgr.get_computed_blocks(b)
    assert mgr.allocate_slots(b, 6, hits) is not None
    assert len(mgr.get_block_ids("b")) == 4
    mgr.free(b)
    mgr.free(b)
    assert mgr.get_num_free_blocks() == 8 and mgr.get_block_ids("b") == []
    assert mgr.reset_prefix_cache() and mgr.get_computed_blocks(b) == ([], 0)


def test_caching_disabled() -> None:
    mgr = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    run_prefill(mgr, Req("a", SYS + [1]))
    assert mgr.get_computed_blocks(Req("b", SYS + [1])) == ([], 0)
    assert not mgr.block_pool.cached_block_hash_to_block
    assert mgr.prefix_cache_queries == 0


def test_decode_hashes_incrementally(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Counter[str]()

    def counting_hash(x: object) -> int:
        calls["n"] += 1
        return hash(x)

    monkeypatch.setattr(kv_cache_utils, "_hash_fn", counting_hash)
    mgr = KVCacheManager(num_blocks=20, block_size=4)
    r = Req("r", list(range(6)))
    run_prefill(mgr, r)
    for t in range(30):
        r.all_token_ids.append(t)
        assert mgr.allocate_slots(r, 1) is not None
        r.num_computed_tokens += 1
    assert calls["n"] == r.num_tokens // 4  # each full block hashed once


# ---- stateful model check ----------------------------------------------

DRAFT = -1  # KV written into a lookahead slot: never final
PREFIXES = [[], [0, 1, 2, 0, 1, 2, 0, 1], [2, 2, 1, 1, 0, 0]]


class ManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler + model runner and shadows the KV
    contents per slot, so a wrong hit shows up as wrong tokens in a block."""

    @initialize(
        bs=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(1, 12),
        caching=st.sampled_from([True, True, True, False]),
    )
    def setup(self, bs: int, num_blocks: int, caching: bool) -> None:
        self.bs = bs
        self.mgr = KVCacheManager(num_blocks, bs, caching)
        self.kv: dict[int, list[int | None]] = {i: [None] * bs for i in range(num_blocks)}
        self.live: dict[str, Req] = {}
        self.scheduled: set[str] = set()  # allocated since (re)start: no new lookup
        self.next_id = 0

    def _pick(self, i: int, pending: bool | None = None) -> Req | None:
        cands = [
            r
            for r in self.live.values()
            if pending is None
            or (pending and r.num_computed_tokens < r.num_tokens)
            or (not pending and r.num_computed_tokens == r.num_tokens)
        ]
        return cands[i % len(cands)] if cands else None

    def _write(self, req: Req, start: int, values: list[int]) -> None:
        blocks = self.mgr.get_blocks(req.request_id)
        for p, v in enumerate(values, start):
            self.kv[blocks[p // self.bs].block_id][p % self.bs] = v

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 2), max_size=10),
        salt=st.sampled_from([None, None, "fp8"]),
    )
    def add_request(self, prefix: list[int], suffix: list[int], salt: str | None) -> None:
        tokens = prefix + suffix or [0]
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.live[rid] = Req(rid, tokens, cache_salt=salt)

    @rule(i=st.integers(0, 99), chunk=st.integers(1, 16), lookahead=st.integers(0, 3))
    def schedule(self, i: int, chunk: int, lookahead: int) -> None:
        req = self._pick(i, pending=True)
        if req is None:
            return
        hits, n_hit = [], 0
        if req.request_id not in self.scheduled:
            assert req.num_computed_tokens == 0
            hits, n_hit = self.mgr.get_computed_blocks(req)
            assert n_hit == len(hits) * self.bs and n_hit <= req.num_tokens - 1
            for j, blk in enumerate(hits):  # a hit must hold exactly our tokens
                assert self.kv[blk.block_id] == req.all_token_ids[j * self.bs : (j + 1) * self.bs]
        start = req.num_computed_tokens + n_hit
        n = min(chunk, req.num_tokens - start)
        before = _snapshot(self.mgr, list(self.live))
        if self.mgr.allocate_slots(req, n, hits, lookahead) is None:
            assert _snapshot(self.mgr, list(self.live)) == before
            return
        self.scheduled.add(req.request_id)
        self._write(req, start, req.all_token_ids[start : start + n] + [DRAFT] * lookahead)
        req.num_computed_tokens = start + n

    @rule(i=st.integers(0, 99), token=st.integers(0, 2), lookahead=st.integers(0, 3))
    def decode(self, i: int, token: int, lookahead: int) -> None:
        req = self._pick(i, pending=False)
        if req is None:
            return
        req.all_token_ids.append(token)  # sampled: final even if not scheduled now
        if self.mgr.allocate_slots(req, 1, None, lookahead) is not None:
            self._write(req, req.num_computed_tokens, [token] + [DRAFT] * lookahead)
            req.num_computed_tokens += 1

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), preempt=st.booleans())
    def free(self, i: int, preempt: bool) -> None:
        req = self._pick(i)
        assert req is not None
        self.mgr.free(req)
        self.scheduled.discard(req.request_id)
        if preempt:
            req.num_computed_tokens = 0
        else:
            del self.live[req.request_id]

    @invariant()
    def ref_counts_and_free_queue(self) -> None:
        pool = self.mgr.block_pool
        held = Counter(b.block_id for r in self.live for b in self.mgr.get_blocks(r))
        for blk in pool.blocks:
            assert blk.ref_cnt >= 0 and blk.ref_cnt == held[blk.block_id]
        queued = [b.block_id for b in pool.free_block_queue]
        assert len(queued) == len(set(queued)) == pool.get_num_free_blocks()
        assert set(queued) == {b.block_id for b in pool.blocks if b.ref_cnt == 0}
        assert self.mgr.prefix_cache_hits <= self.mgr.prefix_cache_queries

    @invariant()
    def hash_map_matches_kv(self) -> None:
        pool = self.mgr.block_pool
        for key, blk in pool.cached_block_hash_to_block.items():
            assert blk.block_hash == key
            assert self.kv[blk.block_id] == list(key.token_ids)
        for blk in pool.blocks:
            if blk.block_hash is not None:
                assert pool.get_cached_block(blk.block_hash) is blk

    @invariant()
    def requests_see_their_tokens(self) -> None:
        bs = self.bs
        for r in self.live.values():
            blocks = self.mgr.get_blocks(r.request_id)
            assert len(blocks) >= cdiv(r.num_computed_tokens, bs)
            for p in range(r.num_computed_tokens):
                assert self.kv[blocks[p // bs].block_id][p % bs] == r.all_token_ids[p]
            parent: int | None = None  # hashed blocks carry this prefix's chain
            for j, blk in enumerate(blocks[: r.num_tokens // bs]):
                want = hash_block_tokens(
                    parent, r.all_token_ids[j * bs : (j + 1) * bs], r.cache_salt if j == 0 else None
                )
                assert blk.block_hash in (None, want)
                parent = want.hash_value

    def teardown(self) -> None:
        if not hasattr(self, "mgr"):
            return
        for r in list(self.live.values()):
            self.mgr.free(r)
        assert self.mgr.get_num_free_blocks() == self.mgr.num_blocks
        assert self.mgr.usage == 0.0


ManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestManagerMachine = ManagerMachine.TestCase
