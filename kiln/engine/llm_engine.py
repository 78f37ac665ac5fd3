"""The synchronous engine: add_request / step / abort_request / has_unfinished_requests.

One `step()` = propose drafts → schedule → one forward over the mixed batch → sample →
scheduler bookkeeping (`update_from_output`) → output processor (stops, detokenization) →
the scheduler frees what finished → RequestOutputs for every request that progressed. Data
flows one way through it: nothing downstream reaches back into an earlier stage. The async
server drives exactly this loop from its own thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from kiln.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, SpeculativeConfig
from kiln.core.hybrid_kv_cache_manager import HybridKVCacheManager
from kiln.core.kv_cache_manager import KVCacheManager
from kiln.engine.hybrid_kv import plan_hybrid_kv
from kiln.core.scheduler import Scheduler, SchedulerOutput, SchedulerStats
from kiln.engine.kv_budget import KVBudget, plan_kv_cache
from kiln.engine.multi_step import cache_trip_blocks, plan_trip
from kiln.engine.output_processor import OutputProcessor
from kiln.engine.request_validation import PromptInput, RequestValidation, TokenizedPrompt  # noqa: F401 (re-exported)
from kiln.engine.startup_checks import check_startup
from kiln.loader.model_loader import LoadedModel, load_model
from kiln.offload.weight_offload import weight_offload_config
from kiln.lora.adapter import LoRAError
from kiln.lora.manager import LoRAManager
from kiln.lora.request import LoRARequest
from kiln.outputs import RequestOutput
from kiln.request import Request, RequestStatus
from kiln.sampling_params import SamplingParams
from kiln.spec_decode.spec_decoder import SpecDecoder, SpecDecodeStats, build_spec_decoder
from kiln.structured_output.backend import GrammarBackend
from kiln.structured_output.manager import StructuredOutputManager
from kiln.worker.model_runner import ModelRunner, RunnerOutput

if TYPE_CHECKING:
    from kiln.engine.arg_utils import EngineArgs


logger = logging.getLogger("kiln")


@dataclass
class EngineStats:
    scheduler: SchedulerStats
    num_blocks: int
    step_count: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)  # all zero when speculation is off


class LLMEngine(RequestValidation):
    def __init__(
        self,
        loaded: LoadedModel,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        speculative_config: SpeculativeConfig | None = None,
        runner_factory: Callable[..., ModelRunner] = ModelRunner,
        lora_config: LoRAConfig | None = None,
    ) -> None:
        """`runner_factory(model, num_blocks, block_size, kv_cache_dtype, kv_groups)` builds the model runner (a
        tensor-parallel engine passes one that drives its other ranks, kiln.distributed)."""
        self.loaded = loaded
        self.speculative_config = speculative_config
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.cache_config = cache_config or CacheConfig()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        check_startup(loaded.config, self.cache_config, self.scheduler_config, str(loaded.model.device))
        self.max_model_len = min(
            self.scheduler_config.max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )
        self.kv_budget: KVBudget = plan_kv_cache(loaded.config, self.cache_config, loaded.model.dtype,
                                                 self.max_model_len, str(loaded.model.device))
        self.kv_groups, self.kv_budget, longest = plan_hybrid_kv(loaded, self.kv_budget, self.scheduler_config)
        if longest < self.max_model_len:
            # A sequence must fit the KV pool on its own: one that outgrew it with nothing left to
            # preempt could never be scheduled again (found by the scheduler state machine).
            logger.warning("context length capped at the KV cache's %d tokens (was %d); raise --kv-cache-memory "
                           "for longer sequences", longest, self.max_model_len)
            self.max_model_len = longest
            self.kv_budget = replace(self.kv_budget, max_model_len=self.max_model_len)
        if self.kv_groups is None:
            self.kv_manager = KVCacheManager(
                self.kv_budget.num_blocks, self.cache_config.block_size, self.cache_config.enable_prefix_caching
            )
        else:
            self.kv_manager = HybridKVCacheManager(self.kv_budget.num_blocks, self.cache_config.block_size,
                                                   self.kv_groups, self.cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager, self.max_model_len)
        self.eos_token_ids = frozenset(loaded.tokenizer.eos_token_ids) | frozenset(loaded.config.eos_token_ids)
        self.runner = runner_factory(loaded.model, self.kv_budget.num_blocks, self.cache_config.block_size,
                                     self.cache_config.kv_cache_dtype, self.kv_groups)
        # Grammars for structured outputs (the engine's tokenizer is built at the first one).
        self.grammar = GrammarBackend(loaded.tokenizer, loaded.config.vocab_size, self.eos_token_ids)
        self.runner.structured = StructuredOutputManager(self.grammar)
        self.lora: LoRAManager | None = None  # the adapters served (kiln.lora), when LoRA is on
        if lora_config is not None:
            self.lora = LoRAManager(loaded.model, lora_config.max_loras, lora_config.max_lora_rank)
            for name, path in lora_config.loras:
                self.lora.add(name, path)
            self.scheduler.admission = self.lora
            self.runner.lora = self.lora
        self.spec: SpecDecoder | None = build_spec_decoder(
            speculative_config, loaded, self.kv_budget.num_blocks, self.cache_config.block_size, self.max_model_len)
        self.output_processor = OutputProcessor(loaded.tokenizer)
        # Set by a driver that takes requests while steps run (AsyncEngine): true when one arrived or was
        # aborted, which ends a multi-step trip after its current step (kiln.worker.multi_step).
        self.trip_interrupt: Callable[[], bool] | None = None
        self._ids = itertools.count()
        self.step_count = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Load the model and build the engine, on the calling thread.

        Every torch and native call of an engine must happen on one thread (OpenMP keeps one worker
        team per thread that enters a parallel region; a second team on the same cores makes every
        parallel region pay a wake-up, kiln issue 25). So the thread that calls this is the one that
        must call `step()`: the kernel switches and the thread count are installed here, for it.
        """
        import torch

        from kiln.hub import resolve_model
        from kiln.kernels import switches

        switches.configure(config.kernel)
        if config.parallel.tensor_parallel_size > 1:
            from kiln.distributed.engine import build_tensor_parallel_engine

            return build_tensor_parallel_engine(cls, config)  # rank 0 here; other ranks never return
        if config.parallel.threads:
            torch.set_num_threads(config.parallel.threads)
        m = config.model
        model_path = resolve_model(m.model)
        # not under a weight budget: timing loads a model fully resident with dense copies of its linears
        if config.kernel.auto_tune and config.kernel.native and m.device == "cpu" and m.max_weight_memory is None:
            from kiln.tuning.auto_tune import ensure_tuned

            ensure_tuned(model_path, torch.get_num_threads())
        loaded = load_model(model_path, m.dtype, m.device, quantized_weights=m.quantized_weights,
                            weight_offload=weight_offload_config(m), huge_pages=m.huge_page_weights)
        return cls(loaded, config.cache, config.scheduler, config.speculative, lora_config=config.lora)

    @classmethod
    def from_engine_args(cls, args: "EngineArgs") -> "LLMEngine":
        return cls.from_config(args.create_engine_config())

    # ---- requests ---------------------------------------------------------------------
    def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Queue a request (n sequences); a prompt not yet processed is tokenized and validated
        here (`process_prompt`). `lora_request`: run it with that adapter (loaded now if it names a path the
        engine does not hold yet). Raises ValueError on bad input."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.output_processor:
            raise ValueError(f"duplicate request id {request_id!r}")
        prompt = self.process_prompt(prompt)
        self.validate_params(params)
        lora_id = self._lora_id(lora_request)
        token_ids = prompt.token_ids
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        sequences: list[Request] = []
        for i in range(params.n):
            seq_params = params
            if params.n > 1:
                seq_params = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seq = Request(seq_id, token_ids, seq_params, self.eos_token_ids, priority, arrival, self.max_model_len)
            if lora_id:  # its KV blocks are the adapter's own: prefix-cache keys carry the adapter
                seq.lora_id, seq.cache_salt = lora_id, ("lora", lora_id)
            sequences.append(seq)
        self.output_processor.add_request(request_id, prompt.text, token_ids, sequences)
        for req in sequences:
            self.scheduler.add_request(req)
        self.prompt_tokens_total += len(token_ids) * params.n
        return request_id

    # ---- LoRA adapters ----------------------------------------------------------------
    def check_lora(self, lora_request: LoRARequest | None) -> None:
        """LoRAError (a ValueError) when `lora_request` cannot run here: LoRA is off, or it names an adapter
        that is not loaded and gives no path to load it from."""
        if lora_request is None:
            return
        if self.lora is None:
            raise LoRAError("this engine serves no LoRA adapters; start it with --lora NAME=PATH (or --max-loras N "
                            "to load adapters at run time)")
        if not lora_request.lora_path:
            self.lora.id_of(lora_request.lora_name)

    def _lora_id(self, lora_request: LoRARequest | None) -> int:
        self.check_lora(lora_request)
        if lora_request is None:
            return 0
        assert self.lora is not None
        if lora_request.lora_name not in self.lora.adapters:
            return self.lora.add(lora_request.lora_name, lora_request.lora_path)
        return self.lora.id_of(lora_request.lora_name)

    def add_lora(self, name: str, path: str) -> None:
        """Load the PEFT adapter at `path` as `name` (LoRAError says why it cannot serve here)."""
        self.check_lora(LoRARequest(name, 0, path))
        assert self.lora is not None
        self.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload adapter `name`; LoRAError while a queued or running request still uses it."""
        self.check_lora(LoRARequest(name))
        assert self.lora is not None
        lora_id = self.lora.id_of(name)
        users = sum(1 for r in self.scheduler.requests.values() if r.lora_id == lora_id)
        if users:
            raise LoRAError(f"adapter {name!r} is in use by {users} request(s); unload it when they finish")
        self.lora.remove(name)

    def list_loras(self) -> list[str]:
        """Names of the adapters loaded (empty when LoRA is off)."""
        return self.lora.names() if self.lora is not None else []

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests in any state; their KV blocks are freed at once. Unknown ids are ignored."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            for seq_id in self.output_processor.abort_request(rid):
                self.scheduler.finish_request(seq_id, RequestStatus.FINISHED_ABORTED)
                self._release(seq_id)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    @property
    def seq_to_request(self) -> dict[str, str]:
        """Sequence id → request id of every live sequence (read-only for callers)."""
        return self.output_processor.seq_to_request

    # ---- the loop ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        # record_function labels cost ~nothing unless a profiler runs (`kiln bench latency --profile`)
        start = time.perf_counter()
        with record_function("kiln::schedule"):
            if self.spec is not None:
                self.spec.propose(self.scheduler.running)
            sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        self.step_count += 1
        trip = plan_trip(sched, self.scheduler, self.scheduler_config.num_scheduler_steps, self.max_model_len,
                         self.spec is None and self.runner.supports_multi_step())
        result = self.runner.execute(sched) if trip == 1 else self.runner.execute_trip(sched, trip, self.trip_interrupt)
        with record_function("kiln::process_outputs"):
            outputs, kept = self._process_outputs(sched, result)
            for out in outputs:
                out.engine_step = self.step_count
        if self.spec is not None:
            self.spec.observe(sched, result.sampled, kept, time.perf_counter() - start)
        return outputs

    def _process_outputs(self, sched: SchedulerOutput, result: RunnerOutput
                         ) -> tuple[list[RequestOutput], dict[str, list[int]]]:
        """Scheduler bookkeeping → stop decisions and text → the scheduler frees what finished →
        RequestOutputs. Also returns the tokens kept per sequence."""
        new_tokens = self.scheduler.update_from_output(sched, result.sampled)
        step = self.output_processor.process([item.request.request_id for item in sched.scheduled], new_tokens, result)
        if sched.scheduled and sched.scheduled[0].lookahead:
            cache_trip_blocks(sched, self.kv_manager)
        for seq_id, status in step.finished.items():
            self.scheduler.finish_request(seq_id, status)
        outputs, released = self.output_processor.make_outputs(step)
        for seq_id in released:
            self._release(seq_id)
        self.generation_tokens_total += step.num_generated
        return outputs, step.kept

    def _release(self, seq_id: str) -> None:
        """A sequence left the engine (finished or aborted): drop its per-sequence state everywhere."""
        self.runner.remove_requests([seq_id])
        if self.spec is not None:
            self.spec.free(seq_id)

    def close(self) -> None:
        """Stop what the engine runs outside this thread (tensor-parallel ranks); idempotent. An engine
        without such ranks has nothing to stop."""
        self.runner.close()

    def stats(self) -> EngineStats:
        return EngineStats(
            self.scheduler.stats(), self.kv_budget.num_blocks, self.step_count,
            self.prompt_tokens_total, self.generation_tokens_total,
            self.spec.snapshot() if self.spec is not None else SpecDecodeStats(),
        )

    @torch.inference_mode()
    def run_until_done(self) -> dict[str, RequestOutput]:
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return final
