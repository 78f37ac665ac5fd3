"""One replica of `kiln serve --replicas`: a whole kiln engine (AsyncEngine) inside a Ray Serve actor.

The AsyncEngine's own thread loads the model and runs every step (its threading contract holds
inside the actor too: the actor's event loop only relays outputs). With --tensor-parallel-size the
replica's engine is tensor-parallel as it would be under `kiln serve`: its ranks are processes of
this replica.

* `generate` streams a request's outputs: each item is the list of outputs that queued up since the
  last one (merged per request, as the one-engine server merges them for a lagging client).
  Cancelling the call (the client went away, the ingress aborted) aborts the request here.
* `check_health` fails once the engine loop is dead (e.g. a tensor-parallel rank died), so Ray
  Serve replaces the replica instead of routing to it.
* `record_routing_stats` reports the KV pool size, which the prefix router uses as this replica's
  cache capacity.
* Every PUSH_PERIOD_S the replica pushes its Prometheus text to the metrics hub (metrics_hub.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from kiln.engine.arg_utils import EngineArgs
from kiln.engine.async_engine import AsyncEngine
from kiln.engine.llm_engine import LLMEngine
from kiln.outputs import RequestOutput, coalesce_outputs
from kiln.entrypoints.replicas.metrics_hub import PUSH_PERIOD_S
from kiln.entrypoints.replicas.remote_engine import ReplicaFacts

logger = logging.getLogger("kiln.entrypoints.replicas")


class KilnReplica:
    """The engine deployment's class (launch.py wraps it with `serve.deployment`)."""

    async def __init__(self, engine_options: dict[str, Any], max_queue: int | None, hub_name: str | None,
                       hub_namespace: str | None) -> None:
        args = EngineArgs.from_kwargs(**engine_options)
        self.engine = AsyncEngine(lambda: LLMEngine.from_engine_args(args), max_queue)
        # start() waits on the engine thread's load; wait for it off the event loop (the engine
        # thread does the torch work, this thread only waits)
        await asyncio.to_thread(self.engine.start)
        self.name = self._replica_name()
        self._hub = self._find_hub(hub_name, hub_namespace)
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics()) if self._hub else None
        logger.info("kiln replica %s (pid %d) serves %s", self.name, os.getpid(), args.model)

    @staticmethod
    def _replica_name() -> str:
        from ray import serve

        try:
            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a test constructing the class directly)
            return f"pid{os.getpid()}"

    @staticmethod
    def _find_hub(name: str | None, namespace: str | None) -> Any | None:
        if not name:
            return None
        import ray

        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            logger.warning("metrics hub %s not found; this replica's metrics stay off /metrics", name)
            return None

    # ---- called through the ingress's handle --------------------------------------------
    def describe(self) -> ReplicaFacts:
        """The facts the ingress validates requests with (the same tokenizer object, pickled)."""
        e = self.engine.engine
        return ReplicaFacts(
            tokenizer=e.tokenizer, vocab_size=e.model_config.vocab_size, kv_tokens=e.kv_budget.num_tokens,
            num_blocks=e.kv_budget.num_blocks, block_size=e.cache_config.block_size, max_model_len=e.max_model_len,
            max_num_seqs=e.scheduler_config.max_num_seqs, eos_token_ids=frozenset(e.eos_token_ids),
        )

    async def generate(self, prompt: Any, params: Any, request_id: str, priority: int = 0
                       ) -> AsyncIterator[list[RequestOutput]]:
        """The request's outputs in order, batched by what queued up; the last batch ends with the
        finished output. Raises what AsyncEngine.add_request raises (ValueError, QueueFullError,
        EngineUnavailableError) before the first item."""
        queue: asyncio.Queue = asyncio.Queue()
        self.engine.add_request(prompt, params, request_id, priority, queue=queue)
        finished = False
        try:
            while not finished:
                pending = [await queue.get()]
                while not queue.empty():
                    pending.append(queue.get_nowait())
                batch = coalesce_outputs(pending)
                finished = any(o.finished for o in batch)
                yield batch
        finally:
            if not finished:  # cancelled: free the request's KV blocks now
                self.engine.abort(request_id)

    # ---- called by Ray Serve -------------------------------------------------------------
    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError(f"kiln replica {self.name}: the engine loop is not running")

    def record_routing_stats(self) -> dict[str, Any]:
        e = self.engine.engine
        return {"num_blocks": e.kv_budget.num_blocks, "block_size": e.cache_config.block_size}

    async def _push_metrics(self) -> None:
        pid = os.getpid()
        while True:
            try:
                await self._hub.put.remote(self.name, pid, self.engine.metrics.render().decode())
            except Exception:  # the hub restarting must not end the pusher
                logger.warning("could not push metrics to the hub", exc_info=True)
            await asyncio.sleep(PUSH_PERIOD_S)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5.0)
