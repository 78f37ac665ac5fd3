"""The ingress side of the replicas: an AsyncEngine look-alike that kiln's own FastAPI app runs on.

`kiln.entrypoints.openai.api_server.build_app` takes an AsyncEngine; `RemoteEngine` offers the same
surface (tokenizer, max_model_len, `engine.process_prompt` / `validate_params`, `add_request` with a
shared queue, `abort`, `is_alive`, `metrics.render`, `start`, `shutdown`), so every route, the
streaming, the error bodies, the API key and the limits are the one-engine server's own code.

* Validation happens here, before routing, with the engine's own code (`FrontEngine` is a
  RequestValidation over the tokenizer and limits one replica reported), so a bad request is a 400
  with the one-engine server's message and never reaches a replica.
* Each accepted request is one streamed call `KilnReplica.generate(prompt, params, id)` through a
  Ray Serve handle: Ray's request router (kiln's prefix-affinity one by default) picks the replica;
  the outputs come back in order onto the caller's queue.
* Every accepted request ends with exactly one finished output, as AsyncEngine promises: a replica
  that dies before sending anything gets the request retried once on another replica; after that,
  or once tokens were sent, the request finishes with finish_reason "error" and a message that
  says the replica died and is being restarted. `abort` cancels the call, which aborts the request
  on the replica and frees its KV blocks.
* Admission: at most `max_queue` sequences beyond what the replicas run at once (max_num_seqs each,
  at the most replicas there may be) are in flight from this ingress; above that, QueueFullError (503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from kiln.engine.async_engine import EngineUnavailableError, QueueFullError, RequestStream, _Tracked
from kiln.engine.async_engine import AsyncEngine
from kiln.engine.request_validation import PromptInput, RequestValidation
from kiln.outputs import RequestOutput
from kiln.sampling_params import SamplingParams
from kiln.entrypoints.replicas.metrics_hub import PUSH_PERIOD_S, merge_metrics

logger = logging.getLogger("kiln.entrypoints.replicas")


@dataclass(frozen=True)
class ReplicaFacts:
    """What the ingress needs to validate requests like a replica would (KilnReplica.describe)."""

    tokenizer: Any
    vocab_size: int
    kv_tokens: int
    num_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    eos_token_ids: frozenset[int]


@dataclass(frozen=True)
class _Vocab:
    vocab_size: int


@dataclass(frozen=True)
class _KV:
    num_tokens: int


class FrontEngine(RequestValidation):
    """The engine's request checks (kiln.engine.request_validation) over a replica's reported facts."""

    def __init__(self, facts: ReplicaFacts) -> None:
        from kiln.structured_output.backend import GrammarBackend

        self.tokenizer = facts.tokenizer
        self.model_config = _Vocab(facts.vocab_size)
        self.kv_budget = _KV(facts.kv_tokens)
        self.max_model_len = facts.max_model_len
        self.grammar = GrammarBackend(facts.tokenizer, facts.vocab_size, facts.eos_token_ids)
        self.lora = None  # LoRA adapters are per engine; replicas serve the base model only (see RemoteEngine.call)

    def list_loras(self) -> list[str]:
        return []


class RemoteMetrics:
    """`render()` gives the merged metrics of every live replica (refreshed by RemoteEngine)."""

    def __init__(self) -> None:
        self.text = merge_metrics([])
        self.live_replicas = 0

    def render(self) -> bytes:
        return self.text.encode()


def _is_replica_death(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def _cause(exc: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's RayTaskError wrapper."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


class RemoteEngine:
    """An AsyncEngine look-alike whose requests run on the replicas behind `handle`."""

    def __init__(self, handle: Any, facts: ReplicaFacts, hub: Any | None, max_queue: int | None,
                 max_replicas: int, retries: int = 1) -> None:
        self.handle = handle.options(stream=True)
        self.engine = FrontEngine(facts)
        self.facts = facts
        self.hub = hub
        self.max_queue = max_queue
        self.max_in_flight = None if max_queue is None else max_queue + max_replicas * facts.max_num_seqs
        self.retries = retries
        self.metrics = RemoteMetrics()
        self._tasks: dict[str, asyncio.Task] = {}
        self._seqs: dict[str, int] = {}
        self._accepting = True
        self._refresher: asyncio.Task | None = None

    # ---- what build_app reads ------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.facts.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    @property
    def num_active_requests(self) -> int:
        return len(self._tasks)

    def is_alive(self) -> bool:
        """True while at least one replica reports in (what /health says)."""
        return self._accepting and (self.hub is None or self.metrics.live_replicas > 0)

    def start(self) -> None:
        """Start refreshing the merged metrics (called by the app's lifespan, on its event loop)."""
        if self._refresher is None and self.hub is not None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_metrics())

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests and wait up to `timeout` s for in-flight ones (any thread)."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._refresher is not None:  # called off the event loop (the lifespan's to_thread)
            self._refresher.get_loop().call_soon_threadsafe(self._refresher.cancel)

    async def _refresh_metrics(self) -> None:
        while True:
            try:
                snaps = await self.hub.snapshot.remote()
                self.metrics.text = merge_metrics(snaps)
                self.metrics.live_replicas = len(snaps)
            except Exception:  # the hub restarting must not end the refresher
                logger.exception("could not read the replicas' metrics")
            await asyncio.sleep(PUSH_PERIOD_S)

    # ---- requests ------------------------------------------------------------------------
    async def call(self, fn: Any) -> Any:
        """AsyncEngine.call runs `fn` on one engine's thread (loading a LoRA adapter); with replicas there is
        no one engine to run it on, so the adapter routes refuse with a 400."""
        from kiln.lora.adapter import LoRAError

        raise LoRAError("LoRA adapters cannot be loaded into a server with --replicas yet (each replica would need "
                        "it); serve the adapter with a plain `kiln serve`, or merge it (`kiln lora merge`)")

    def add_request(self, prompt: PromptInput, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0, queue: asyncio.Queue | None = None, lora_request: Any = None) -> RequestStream:
        """As AsyncEngine.add_request: validate here, then stream it from a replica onto `queue`."""
        import uuid

        if lora_request is not None:  # check_model names no adapter here (list_loras is empty)
            raise ValueError("LoRA adapters are not served with --replicas")
        params = params or SamplingParams()
        prompt = self.engine.process_prompt(prompt)
        self.engine.validate_params(params)
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        queue = queue if queue is not None else asyncio.Queue()
        if not self._accepting:
            raise EngineUnavailableError("the server is shutting down")
        if request_id in self._tasks:
            raise ValueError(f"duplicate request id {request_id!r}")
        if self.max_in_flight is not None and sum(self._seqs.values()) + params.n > self.max_in_flight:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue} sequences beyond what the replicas "
                                 f"run); retry shortly")
        loop = asyncio.get_running_loop()
        tracked = _Tracked(request_id, loop, queue, params.n, time.monotonic())
        self._seqs[request_id] = params.n
        self._tasks[request_id] = loop.create_task(self._relay(tracked, prompt, params, priority))
        return RequestStream(self, request_id, queue)  # type: ignore[arg-type]  # duck-typed engine

    def abort(self, request_id: str) -> None:
        """Cancel the request's call (its replica aborts it); its queue gets a final 'abort' output."""
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def _relay(self, tracked: _Tracked, prompt: Any, params: SamplingParams, priority: int) -> None:
        attempt = 0
        try:
            while True:
                call = self.handle.generate.remote(prompt, params, tracked.request_id, priority)
                try:
                    async for batch in call:
                        for out in batch:
                            tracked.last = out
                            tracked.queue.put_nowait(out)
                            if out.finished:
                                return
                    self._finish(tracked, "error", "the replica ended the stream without finishing the request")
                    return
                except asyncio.CancelledError:
                    call.cancel()
                    self._finish(tracked, "abort", None)
                    raise
                except Exception as exc:
                    cause = _cause(exc)
                    died = _is_replica_death(cause) or _is_replica_death(exc)
                    if tracked.last is None and attempt < self.retries and (died or isinstance(cause, QueueFullError)):
                        attempt += 1  # nothing was sent yet: another replica can take it from the start
                        logger.warning("request %s: %s; retrying on another replica", tracked.request_id,
                                       type(cause).__name__)
                        continue
                    self._finish(tracked, "error", self._message(cause, died))
                    return
        finally:
            self._tasks.pop(tracked.request_id, None)
            self._seqs.pop(tracked.request_id, None)

    @staticmethod
    def _message(cause: BaseException, died: bool) -> str:
        if died:
            return (f"the replica serving this request stopped ({type(cause).__name__}); Ray Serve is restarting it "
                    f"and the other replicas keep serving: retry the request")
        return f"{type(cause).__name__}: {cause}"

    @staticmethod
    def _finish(tracked: _Tracked, reason: str, error: str | None) -> None:
        out: RequestOutput = AsyncEngine._final_output(tracked, reason, error)
        tracked.queue.put_nowait(out)
