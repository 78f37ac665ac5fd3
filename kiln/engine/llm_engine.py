"""The synchronous engine: add_request / step / abort_request / has_unfinished_requests.

One `step()` = schedule → one forward over the mixed batch → sample → update requests →
detokenize → RequestOutputs for every request that progressed. The async server drives
exactly this loop from its own thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import record_function

from kiln.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from kiln.core.kv_cache_manager import KVCacheManager
from kiln.core.scheduler import Scheduler, SchedulerOutput, SchedulerStats
from kiln.detokenizer import IncrementalDetokenizer
from kiln.engine.kv_budget import KVBudget, plan_kv_cache
from kiln.engine.output_processor import RequestState, SequenceState
from kiln.loader.model_loader import LoadedModel, load_model
from kiln.outputs import RequestOutput
from kiln.request import Request, RequestStatus
from kiln.sampling_params import SamplingParams
from kiln.spec_decode.spec_decoder import SpecDecoder, SpecDecodeStats, build_spec_decoder
from kiln.worker.model_runner import ModelRunner, RunnerOutput

if TYPE_CHECKING:
    from kiln.engine.arg_utils import EngineArgs

logger = logging.getLogger("kiln")

PromptInput = str | list[int] | dict[str, Any]


@dataclass
class EngineStats:
    scheduler: SchedulerStats
    num_blocks: int
    step_count: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec: SpecDecodeStats = field(default_factory=SpecDecodeStats)  # all zero when speculation is off


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        self.loaded = loaded
        self.config: EngineConfig | None = None  # set by from_config
        self.speculative_config = speculative_config
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.cache_config = cache_config or CacheConfig()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.max_model_len = min(
            self.scheduler_config.max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )
        self.kv_budget: KVBudget = plan_kv_cache(loaded.config, self.cache_config, loaded.model.dtype,
                                                 self.max_model_len, str(loaded.model.device))
        self.kv_manager = KVCacheManager(
            self.kv_budget.num_blocks, self.cache_config.block_size, self.cache_config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager, self.max_model_len)
        self.runner = ModelRunner(loaded.model, self.kv_budget.num_blocks, self.cache_config.block_size,
                                  self.cache_config.kv_cache_dtype)
        self.spec: SpecDecoder | None = build_spec_decoder(
            speculative_config, loaded, self.kv_budget.num_blocks, self.cache_config.block_size, self.max_model_len)
        self.eos_token_ids = frozenset(loaded.tokenizer.eos_token_ids) | frozenset(loaded.config.eos_token_ids)
        self.states: dict[str, RequestState] = {}
        self.seq_to_request: dict[str, str] = {}
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
        if config.parallel.threads:
            torch.set_num_threads(config.parallel.threads)
        m = config.model
        loaded = load_model(resolve_model(m.model), m.dtype, m.device, quantized_weights=m.quantized_weights)
        engine = cls(loaded, config.cache, config.scheduler, config.speculative)
        engine.config = config
        return engine

    @classmethod
    def from_engine_args(cls, args: "EngineArgs") -> "LLMEngine":
        return cls.from_config(args.create_engine_config())

    # ---- requests ---------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self.tokenize_prompt(prompt["prompt"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("prompt must be a string, a list of token ids, or {'prompt_token_ids': [...]}")

    def validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in token_ids):
            raise ValueError(f"prompt contains token ids outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens, but the context length is {self.max_model_len} tokens "
                f"(prompt + output must fit); shorten the prompt"
            )
        if len(token_ids) + 1 > self.kv_budget.num_tokens:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens but the KV cache holds only {self.kv_budget.num_tokens}; "
                f"raise --kv-cache-memory"
            )

    def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> str:
        """Validate, tokenize and queue a request (n sequences). Raises ValueError on bad input."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.states:
            raise ValueError(f"duplicate request id {request_id!r}")
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        sequences: list[SequenceState] = []
        for i in range(params.n):
            seq_params = params
            if params.n > 1:
                from dataclasses import replace

                seq_params = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(seq_id, token_ids, seq_params, self.eos_token_ids, priority, arrival, self.max_model_len)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            sequences.append(SequenceState(req, i, detok))
        state = RequestState(request_id, text, token_ids, sequences)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.states[request_id] = state
        for seq in sequences:
            self.seq_to_request[seq.request.request_id] = request_id
            self.scheduler.add_request(seq.request)
        self.prompt_tokens_total += len(token_ids) * params.n
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests in any state; their KV blocks are freed at once. Unknown ids are ignored."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            state = self.states.pop(rid, None)
            if state is None:
                continue
            for seq in state.sequences:
                self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_ABORTED)
                self.seq_to_request.pop(seq.request.request_id, None)
                self._release(seq.request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

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
        result = self.runner.execute(sched)
        sampled = dict(result.sampled)  # the runner's lists, before token stops cut the entries
        with record_function("kiln::process_outputs"):
            outputs = self._process_outputs(sched, result)
        if self.spec is not None:
            self.spec.observe(sched, sampled, result.sampled, time.perf_counter() - start)
        return outputs

    def _release(self, seq_id: str) -> None:
        """A sequence left the engine (finished or aborted): drop its per-sequence state everywhere."""
        self.runner.remove_requests([seq_id])
        if self.spec is not None:
            self.spec.free(seq_id)

    def _process_outputs(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        self.scheduler.update_from_output(sched, result.sampled)
        touched: dict[str, RequestState] = {}
        for item in sched.scheduled:
            seq_id = item.request.request_id
            rid = self.seq_to_request.get(seq_id)
            state = self.states.get(rid) if rid else None
            if state is None:
                continue
            seq = next(s for s in state.sequences if s.request.request_id == seq_id)
            if seq_id in result.prompt_logprobs and state.prompt_logprobs is not None and seq.index == 0:
                for _, lp, top in result.prompt_logprobs[seq_id]:
                    state.prompt_logprobs.append(dict(top) | {_: lp})
            tokens = result.sampled.get(seq_id)
            if tokens:
                self.generation_tokens_total += len(tokens)
                lps = result.logprobs.get(seq_id)
                self._record_logprobs(seq, lps[: len(tokens)] if lps else lps)
                try:
                    if seq.add_tokens(tokens):
                        self.scheduler.finish_request(seq_id, RequestStatus.FINISHED_STOPPED)
                except Exception as exc:  # one request's failure must not take down the batch
                    logger.exception("request %s failed in output processing", seq_id)
                    state.error = f"{type(exc).__name__}: {exc}"
                    self.scheduler.finish_request(seq_id, RequestStatus.FINISHED_ERROR)
                touched[rid] = state
        outputs: list[RequestOutput] = []
        for rid, state in touched.items():
            out = state.to_output()
            outputs.append(out)
            if out.finished:
                self.states.pop(rid, None)
                for seq in state.sequences:
                    self.seq_to_request.pop(seq.request.request_id, None)
                    self._release(seq.request.request_id)
        return outputs

    def _record_logprobs(self, seq: SequenceState, entries: list[tuple[float, list[tuple[int, float]]]] | None) -> None:
        if entries is None:
            return
        if seq.logprobs is None:
            seq.logprobs, seq.cumulative_logprob = [], 0.0
        tokens = seq.request.output_token_ids[-len(entries):]
        for token, (lp, top) in zip(tokens, entries):
            seq.logprobs.append(dict(top) | {token: lp})
            seq.cumulative_logprob += lp

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
