"""Prefix-affinity routing as a Ray Serve request router (Ray Serve 2.60's RequestRouter API).

Ray Serve asks `choose_replicas` for ranked groups of replicas and, within the first group that has
room, sends the request to the one with the shortest queue (it probes queue lengths itself). So:

* the prompt's full blocks are hashed as the replicas' prefix caches hash them (prefix_index.py);
* if some replica probably holds the first block or more, and its load is within `imbalance`
  requests of the least-loaded replica's, it is the first group on its own, and every other replica
  is the second group (used only when it is full);
* otherwise (a new prefix, or the holder is too busy) all replicas form one group: least loaded.

After a request is sent, its blocks are credited to the replica that got it (`on_request_routed`),
so the next turn of the same conversation, or the next request with the same system prompt, follows.
A replica that dies or leaves is forgotten (its restarted successor starts with an empty cache).

The request's prompt is the first argument of `KilnReplica.generate` (a TokenizedPrompt): the ingress
tokenizes before routing, so the router reads token ids, not text.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kiln.entrypoints.replicas.prefix_index import PrefixIndex, block_hashes

logger = logging.getLogger("kiln.entrypoints.replicas")


class PrefixAffinityRouter(RequestRouter):
    """Route to the replica that holds the prompt's prefix, else to the least-loaded replica."""

    def initialize_state(self, block_size: int = 16, imbalance: int = 8, **_: Any) -> None:
        """Ray passes RequestRouterConfig.request_router_kwargs here. `imbalance`: how many more
        in-flight requests than the least-loaded replica a prefix holder may have and still win."""
        self.block_size = int(block_size)
        self.imbalance = int(imbalance)
        self.index = PrefixIndex()
        self.in_flight: dict[ReplicaID, int] = {}
        self.decisions = {"prefix": 0, "least_loaded": 0}

    # ---- choosing ---------------------------------------------------------------------
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        for r in candidate_replicas:  # the pool size each replica reports (KilnReplica.record_routing_stats)
            blocks = (r.routing_stats or {}).get("num_blocks")
            if blocks:
                self.index.set_capacity(r.replica_id, blocks)
        by_load = sorted(candidate_replicas, key=self._load)
        hashes = self._hashes(pending_request)
        if hashes:
            holder, matched = self.index.best([r.replica_id for r in by_load], hashes)
            if holder is not None:
                chosen = next(r for r in by_load if r.replica_id == holder)
                if self._load(chosen) <= self._load(by_load[0]) + self.imbalance:
                    self.decisions["prefix"] += 1
                    return [[chosen], [r for r in by_load if r is not chosen]]
        self.decisions["least_loaded"] += 1
        return [by_load]

    def _load(self, replica: RunningReplica) -> int:
        """Requests in flight at the replica: Ray's probed queue length when fresh, else our own count."""
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return cached if cached is not None else self.in_flight.get(replica.replica_id, 0)

    def _hashes(self, pending_request: PendingRequest | None) -> list[int]:
        if pending_request is None:
            return []
        prompt = pending_request.args[0] if pending_request.args else pending_request.kwargs.get("prompt")
        token_ids = getattr(prompt, "token_ids", None)
        return block_hashes(token_ids, self.block_size) if token_ids else []

    # ---- Ray Serve's callbacks --------------------------------------------------------
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
        hashes = self._hashes(pending_request)
        if hashes:
            self.index.record(replica_id, hashes)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.in_flight.get(replica_id, 0) > 0:
            self.in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in [rid for rid in self.in_flight if rid not in live]:
            self._forget(gone)

    def _forget(self, replica_id: ReplicaID) -> None:
        self.index.drop(replica_id)
        self.in_flight.pop(replica_id, None)
        logger.info("prefix router: forgot replica %s", replica_id)
