"""AsyncEngine: one LLMEngine driven by one background thread, for asyncio callers (the server).

Threading contract:
* One thread does every torch and native call: built with an engine *factory* (what `kiln serve`
  does), the engine thread loads the model, warms it up and runs every step, and no other thread
  of the process enters an OpenMP parallel region. A second thread running torch work beside it
  would own a second OpenMP team on the same cores, and every parallel region of a decode step then
  pays a sleeping-worker wake-up (measured on a 2-core Xeon: a 1x576x1536 matmul 75 -> 200+ us,
  `kiln serve` decoding at half `LLM.generate`'s speed; kiln issue 25). Built with a ready
  LLMEngine, the caller promises the same: it must not run torch work on any other thread.
* Only the engine thread touches the LLMEngine's mutable state (add_request, step, abort_request,
  stats). Other threads hand it commands through a list guarded by one Condition, so the engine
  itself needs no locks, and a forward pass never blocks the event loop.
* `add_request` validates on the caller's thread with the engine's read-only parts (tokenizer,
  model config, KV budget; SamplingParams validate themselves), so bad input raises ValueError
  to the caller at once; a full waiting queue raises QueueFullError, a stopped engine
  EngineUnavailableError.
* Outputs go back to the caller's event loop through `loop.call_soon_threadsafe` onto an
  asyncio.Queue, one callback per event loop per engine iteration (not one per request: at 64
  streams that is 64 loop wake-ups per step saved). Every accepted request ends with exactly one RequestOutput with finished=True
  (finish reason stop, length, abort or error), so no consumer waits forever.
* An exception inside `step()` finishes the requests that step was running with
  finish_reason "error" (and `RequestOutput.error` set); the loop keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from kiln.engine.arg_utils import EngineArgs
from kiln.engine.llm_engine import LLMEngine, PromptInput
from kiln.engine.metrics import EngineMetrics
from kiln.lora.request import LoRARequest
from kiln.outputs import CompletionOutput, RequestOutput
from kiln.sampling_params import SamplingParams

logger = logging.getLogger("kiln.async_engine")


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_queue` sequences already; retry later (HTTP 503)."""


class EngineUnavailableError(RuntimeError):
    """The engine loop is shutting down or has died; no new requests are taken (HTTP 503)."""


@dataclass(slots=True, eq=False)
class _Tracked:
    """Engine-thread bookkeeping for one request: where its outputs go, and its timings."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int
    arrival: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    last: RequestOutput | None = None


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """Runs on a caller's event loop: hand one engine iteration's outputs to their queues."""
    for queue, out in items:
        queue.put_nowait(out)


class RequestStream:
    """The outputs of one request, in order; the last has `finished=True`.

    Iterate it (once) to consume them; leaving the loop early (break, cancellation, a client
    that went away) aborts the request, which frees its KV blocks. Callers that passed a shared
    `queue` to `add_request` read that queue themselves instead.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue = queue

    def abort(self) -> None:
        self.engine.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out: RequestOutput = await self.queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort()


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        max_queue: int | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        """`engine`: a ready LLMEngine, or a factory that builds one; the factory runs on the engine
        thread (in `start()`), so loading and every step share one thread and one OpenMP team."""
        self._factory: Callable[[], LLMEngine] | None = None
        if isinstance(engine, LLMEngine):
            self.engine = engine
        else:
            self._factory = engine
            self.engine = None  # type: ignore[assignment]  # set by the engine thread before `start` returns
        self.max_queue = max_queue  # waiting sequences allowed (None: unbounded); read at each add
        self.metrics = metrics or EngineMetrics()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._cv = threading.Condition()
        # Guarded by _cv: the command list and what the engine thread publishes to callers.
        self._commands: list[tuple[str, Any]] = []
        self._pending_adds = 0  # sequences queued as commands, not yet in the scheduler
        self._num_waiting = 0  # scheduler's waiting sequences after the last iteration
        self._active_ids: set[str] = set()
        self._accepting = True
        self._stopping = False
        self._dead: str | None = None
        self._thread: threading.Thread | None = None
        # Engine thread only.
        self._tracked: dict[str, _Tracked] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}

    # ---- read-only facts (safe from any thread) ----------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_active_requests(self) -> int:
        with self._cv:
            return len(self._active_ids)

    def is_alive(self) -> bool:
        """True while the engine loop runs and takes requests (what /health reports)."""
        t = self._thread
        return t is not None and t.is_alive() and self._dead is None

    # ---- lifecycle ---------------------------------------------------------------------
    @classmethod
    def from_engine_args(cls, args: EngineArgs, max_queue: int | None = None) -> "AsyncEngine":
        """Start an engine thread that loads the model `args` name and serves it; returns once it is
        loaded (a bad model or option raises here, as it would offline)."""
        engine = cls(lambda: LLMEngine.from_engine_args(args), max_queue)
        engine.start()
        return engine

    def start(self) -> None:
        """Start the engine thread (idempotent) and wait until its engine is loaded.

        Raises whatever the engine factory raised (the thread has then stopped)."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
                self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to `timeout` s, abort the rest, stop."""
        with self._cv:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            with self._cv:
                if not self._active_ids:
                    break
            time.sleep(0.02)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    # ---- requests (any thread with a running event loop) -------------------------------
    def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        queue: asyncio.Queue | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Validate and queue a request. Raises ValueError (bad input), QueueFullError, EngineUnavailableError.

        Must be called from the event loop that consumes the outputs.
        """
        loop = asyncio.get_running_loop()
        params = params or SamplingParams()
        # Tokenized and validated here, once (a TokenizedPrompt passes through): errors reach the
        # caller, and the engine thread's add_request takes the result as it is.
        prompt = self.engine.process_prompt(prompt)
        self.engine.validate_params(params)  # a bad grammar or logit_bias is the caller's 400, before queueing
        self.engine.check_lora(lora_request)  # an unknown adapter is the caller's error, before queueing
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        queue = queue if queue is not None else asyncio.Queue()
        tracked = _Tracked(request_id, loop, queue, params.n, time.monotonic())
        with self._cv:
            if self._dead is not None or not self._accepting:
                raise EngineUnavailableError(
                    "the server is shutting down" if self._dead is None else f"the engine loop died: {self._dead}"
                )
            if request_id in self._active_ids:
                raise ValueError(f"duplicate request id {request_id!r}")
            if self.max_queue is not None and self._num_waiting + self._pending_adds + params.n > self.max_queue:
                raise QueueFullError(
                    f"the waiting queue is full ({self.max_queue} sequences); retry shortly"
                )
            self._active_ids.add(request_id)
            self._pending_adds += params.n
            payload = (tracked, prompt, params, priority, lora_request)
            self._commands.append(("add", payload))
            self._cv.notify()
        return RequestStream(self, request_id, queue)

    def abort(self, request_id: str) -> None:
        """Abort a request in any state (thread-safe, idempotent); its stream gets a final 'abort' output."""
        with self._cv:
            if request_id not in self._active_ids:
                return
            self._commands.append(("abort", request_id))
            self._cv.notify()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between steps (loading or unloading a LoRA adapter touches
        torch state only that thread may) and return its result; its exception is raised here."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._dead is not None or not self._accepting:
                raise EngineUnavailableError("the engine is not running")
            self._commands.append(("call", (fn, future)))
            self._cv.notify()
        return await asyncio.wrap_future(future)

    async def generate(
        self, prompt: PromptInput, params: SamplingParams | None = None, request_id: str | None = None, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs as they come (validation errors raise on the first iteration)."""
        stream = self.add_request(prompt, params, request_id, priority)
        async for out in stream:
            yield out

    # ---- the engine thread -------------------------------------------------------------
    def _load(self) -> bool:
        """Engine thread: build the engine when a factory was given. False when that failed."""
        try:
            if self._factory is not None:
                self.engine = self._factory()
            return True
        except BaseException as exc:  # handed to the thread that called start()
            self._load_error = exc
            with self._cv:
                self._dead = f"loading failed: {type(exc).__name__}: {exc}"
            return False
        finally:
            self._ready.set()

    def _run(self) -> None:
        if not self._load():
            return
        try:
            self._serve()
        finally:
            close = getattr(self.engine, "close", None)  # test doubles may have none
            if close is not None:
                close()  # a tensor-parallel engine's other ranks stop with this thread

    def _serve(self) -> None:
        if hasattr(self.engine, "trip_interrupt"):  # test doubles may have none
            # a multi-step trip ends after its current step when a request arrives or is aborted
            # (reading the list's length needs no lock: a stale answer only delays by one step)
            self.engine.trip_interrupt = lambda: bool(self._commands) or self._stopping
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                if commands:  # publish before the step, so the queue-length check sees them at once
                    self._publish(self._apply(commands))
                    self._flush()  # aborts answer now, not after the next step
                if stopping:
                    self._finish_all("abort", None)
                    self._publish(0)
                    self._flush()
                    return
                if self.engine.has_unfinished_requests():
                    progressed = self._step()
                    self._publish(0)
                else:
                    progressed = True
                self._flush()
                if not progressed:
                    # Work exists but nothing was schedulable: wait a little instead of spinning.
                    with self._cv:
                        if not self._commands:
                            self._cv.wait(0.005)
        except BaseException as exc:  # a bug in this loop: fail loudly, and let /health say so
            logger.exception("kiln engine loop died")
            with self._cv:
                self._dead = f"{type(exc).__name__}: {exc}"
            self._finish_all("error", f"the engine loop died: {self._dead}")
            self._flush()

    def _post(self, tracked: _Tracked, out: RequestOutput) -> None:
        """Queue an output for its caller; `_flush` sends it (engine thread only)."""
        self._outbox.setdefault(tracked.loop, []).append((tracked.queue, out))

    def _flush(self) -> None:
        """Send everything posted since the last flush: one callback per event loop."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass

    def _apply(self, commands: list[tuple[str, Any]]) -> int:
        added = 0
        for kind, payload in commands:
            if kind == "add":
                tracked, prompt, params, priority, lora_request = payload
                added += params.n
                try:
                    self.engine.add_request(prompt, params, tracked.request_id, priority, tracked.arrival,
                                            lora_request=lora_request)
                except Exception as exc:  # a processed prompt: anything raised here is unexpected
                    logger.exception("engine rejected request %s", tracked.request_id)
                    self._tracked[tracked.request_id] = tracked
                    self._finish(tracked, "error", f"{type(exc).__name__}: {exc}")
                    continue
                self._tracked[tracked.request_id] = tracked
            elif kind == "call":
                fn, future = payload
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # the caller's error (a bad adapter): handed back to it
                    future.set_exception(exc)
            elif kind == "abort":
                tracked = self._tracked.get(payload)
                if tracked is not None:
                    self.engine.abort_request(payload)
                    self._finish(tracked, "abort", None)
        return added

    def _step(self) -> bool:
        before = self.engine.step_count
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._on_step_error(exc)
            if getattr(exc, "fatal", False):  # e.g. a tensor-parallel rank died: no later step can run
                raise
            return True
        now = time.monotonic()
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            if any(o.delta_token_ids for o in out.outputs):
                if tracked.first_token_time is None:
                    tracked.first_token_time = now
                    self.metrics.observe_first_token(now - tracked.arrival)
                else:
                    self.metrics.observe_inter_token(now - (tracked.last_token_time or now))
                tracked.last_token_time = now
            tracked.last = out
            if out.finished:
                self._finish(tracked, out=out)
            else:
                self._post(tracked, out)
        return self.engine.step_count != before

    def _on_step_error(self, exc: Exception) -> None:
        logger.exception("engine step failed; finishing the requests it was running with an error")
        self.metrics.step_errors.inc()
        message = f"internal error while generating: {type(exc).__name__}: {exc}"
        try:  # the requests the failed step ran; their engine state is suspect, so drop them
            running = {self.engine.seq_to_request.get(r.request_id) for r in self.engine.scheduler.running}
            affected = [rid for rid in running if rid in self._tracked]
        except Exception:
            affected = []
        for rid in affected or list(self._tracked):
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("abort of %s after a failed step also failed", rid)
            self._finish(self._tracked[rid], "error", message)

    def _finish_all(self, reason: str, error: str | None) -> None:
        for tracked in list(self._tracked.values()):
            try:
                self.engine.abort_request(tracked.request_id)
            except Exception:
                logger.exception("abort of %s failed", tracked.request_id)
            self._finish(tracked, reason, error)

    def _finish(
        self, tracked: _Tracked, reason: str | None = None, error: str | None = None, out: RequestOutput | None = None
    ) -> None:
        """Deliver the last output of a request (synthesized for abort/error) and record its metrics."""
        if out is None:
            out = self._final_output(tracked, reason or "abort", error)
        self._tracked.pop(tracked.request_id, None)
        with self._cv:
            self._active_ids.discard(tracked.request_id)
        now = time.monotonic()
        tokens = max((len(o.token_ids) for o in out.outputs), default=0)
        tpot = None
        if tracked.first_token_time is not None and tracked.last_token_time is not None and tokens > 1:
            tpot = (tracked.last_token_time - tracked.first_token_time) / (tokens - 1)
        self.metrics.observe_finished([o.finish_reason for o in out.outputs], now - tracked.arrival, tpot)
        self._post(tracked, out)

    @staticmethod
    def _final_output(tracked: _Tracked, reason: str, error: str | None) -> RequestOutput:
        last = tracked.last
        if last is None:
            outputs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason=reason) for i in range(tracked.n)]
            return RequestOutput(tracked.request_id, None, [], outputs, finished=True, error=error)
        outputs = [
            replace(o, finish_reason=o.finish_reason or reason, delta_text="", delta_token_ids=[]) for o in last.outputs
        ]
        return replace(last, outputs=outputs, finished=True, error=error)

    def _publish(self, added: int) -> None:
        stats = self.engine.stats()
        self.metrics.observe_engine(stats)
        with self._cv:
            self._pending_adds -= added
            self._num_waiting = stats.scheduler.num_waiting
