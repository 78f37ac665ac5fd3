"""SchedulerOutput → tensors → one forward → logits → sampled tokens.

The runner owns the model, the KV cache tensors and per-request sampling state (seeded
generators). It reads Requests but never changes them; the scheduler applies the result.
Decode rows are placed first in the flat batch so attention can take them in one kernel
call; logits are computed only for rows that sample (or that need prompt logprobs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from kiln.core.kv_cache_groups import KVCacheGroup
from kiln.core.scheduler import ScheduledRequest, SchedulerOutput
from kiln.kernels.attention_metadata import AttentionMetadata, build_attention_metadata, build_group_metadata
from kiln.lora.manager import LoRAManager
from kiln.models.architecture import CausalLM
from kiln.sample.rejection_sampler import verify_drafts
from kiln.sample.sampler import SampleRow, Sampler
from kiln.structured_output.manager import GrammarRow, PendingMasks, StructuredOutputManager
from kiln.worker.forward import allocate_model_kv_caches
from kiln.worker.multi_step import run_trip

if TYPE_CHECKING:
    from kiln.models.decode_plan import TripStep

TopLogprobs = list[tuple[int, float]]
_NOT_STARTED = object()  # `_sample` was given no grammar masks: it starts them itself
_NOT_BUILT = object()  # `trip_step` not asked for yet


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)
    # request id → per sampled token: (logprob, top-n)
    logprobs: dict[str, list[tuple[float, TopLogprobs]]] = field(default_factory=dict)
    # request id → per prompt position computed this step: (token, logprob, top-n)
    prompt_logprobs: dict[str, list[tuple[int, float, TopLogprobs]]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self, model: CausalLM, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto",
        kv_groups: list[KVCacheGroup] | None = None,
    ) -> None:
        """`kv_cache_dtype`: one of config.KV_CACHE_DTYPES ('auto': kv_quant.full_precision_kv_dtype).
        `kv_groups`: a hybrid cache's layer groups (then each request's block ids are one list per group).
        `structured` (set by the engine): the grammar matchers of requests with structured outputs."""
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.kv_caches = allocate_model_kv_caches(model, num_blocks, block_size, kv_cache_dtype, kv_groups)
        self.layer_group: tuple[int, ...] | None = None
        if kv_groups is not None:
            owner = {layer: g for g, group in enumerate(kv_groups) for layer in group.layers}
            self.layer_group = tuple(owner[i] for i in range(len(owner)))
        self.sampler = Sampler()
        self._trip_step: object = _NOT_BUILT  # kiln.worker.multi_step's step, see `trip_step`
        self.generators: dict[str, torch.Generator] = {}
        self.structured: StructuredOutputManager | None = None
        self.lora: LoRAManager | None = None  # set by the engine when it serves LoRA adapters

    def close(self) -> None:
        """Release what the runner holds outside this process (a tensor-parallel runner's ranks); idempotent."""

    def remove_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)
        if self.structured is not None:
            self.structured.remove(request_ids)

    def _generator(self, item: ScheduledRequest) -> torch.Generator | None:
        seed = item.request.sampling_params.seed
        if seed is None:
            return None
        rid = item.request.request_id
        gen = self.generators.get(rid)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[rid] = gen
        return gen

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        with record_function("kiln::prepare_inputs"):
            items, ids, pos, meta = self._prepare(sched)
            # grammar masks are filled on a helper thread while the forward runs
            masks = self._begin_masks(items)
        with record_function("kiln::forward"):
            if self.lora is None:
                hidden = self.model(ids, pos, meta, self.kv_caches)
            else:
                self.lora.begin_step([item.request.lora_id for item in items], meta.query_start_loc)
                try:
                    hidden = self.model(ids, pos, meta, self.kv_caches)
                finally:
                    self.lora.end_step()
        with record_function("kiln::logits_and_sample"):
            return self._sample(items, meta, hidden, masks)

    def supports_multi_step(self) -> bool:
        """Whether pure decode batches may run as multi-step trips (kiln.worker.multi_step): a single
        process whose model has a trip step (its fused native plan) for this runner's caches, plain or hybrid."""
        return self.trip_step() is not None

    def trip_step(self) -> "TripStep | None":
        """The model's trip step over this runner's caches, built at the first pure decode step and kept (the
        caches, their layout and the model's plan are fixed by then); None when the model has none."""
        if self._trip_step is _NOT_BUILT:
            stepper = getattr(self.model, "trip_stepper", None)
            self._trip_step = (stepper(self.kv_caches, self.layer_group)
                               if stepper is not None and self.kv_caches else None)
        return self._trip_step  # type: ignore[return-value]

    @torch.inference_mode()
    def execute_trip(self, sched: SchedulerOutput, num_steps: int,
                     interrupt: Callable[[], bool] | None = None) -> RunnerOutput:
        """Up to `num_steps` decode steps of an all-decode batch whose block tables cover them
        (kiln.engine.multi_step decides when); the same tokens `num_steps` calls of `execute` give.
        `interrupt()` true after a step ends the trip there."""
        with record_function("kiln::multi_step_trip"):
            items = sorted(sched.scheduled, key=lambda s: s.num_tokens != 1)
            return run_trip(self, items, num_steps, interrupt)

    def _begin_masks(self, items: list[ScheduledRequest]) -> PendingMasks | None:
        """Start the token bitmask of this step's sampling rows (laid out as `_sample` lays out its
        logits: per sampling item, its last token then one row per draft)."""
        if self.structured is None:
            return None
        rows, at = [], 0
        for item in items:
            if not item.samples:
                continue
            req = item.request
            spec = req.sampling_params.structured_outputs
            if spec is not None:
                rows.append(GrammarRow(req.request_id, spec, req.output_token_ids, list(item.spec_token_ids), at))  # type: ignore[arg-type]
            at += 1 + len(item.spec_token_ids)
        return self.structured.begin(rows, at)

    def _prepare(
        self, sched: SchedulerOutput
    ) -> tuple[list[ScheduledRequest], torch.Tensor, torch.Tensor, AttentionMetadata]:
        # decodes first (attention takes them as one range), each group by adapter (LoRA segments), stable
        items = sorted(sched.scheduled, key=lambda s: (s.num_tokens != 1, s.request.lora_id))
        token_ids: list[int] = []
        positions: list[int] = []
        for item in items:
            req = item.request
            end = item.start + item.num_tokens - len(item.spec_token_ids)
            token_ids.extend(req.all_token_ids[item.start:end])
            token_ids.extend(item.spec_token_ids)
            positions.extend(range(item.start, item.start + item.num_tokens))
        query_lens, seq_lens = [i.num_tokens for i in items], [i.start + i.num_tokens for i in items]
        if self.layer_group is not None:
            meta = build_group_metadata(query_lens, seq_lens, [i.block_ids for i in items], self.block_size,
                                        self.layer_group, self.device)
        else:
            meta = build_attention_metadata(query_lens, seq_lens, [i.block_ids for i in items], self.block_size,
                                            self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        meta.verification = any(i.spec_token_ids for i in items) and all(
            i.num_tokens == 1 + len(i.spec_token_ids) for i in items)
        return items, ids, pos, meta

    def _sample(self, items: list[ScheduledRequest], meta: AttentionMetadata, hidden: torch.Tensor,
                masks: PendingMasks | None | object = _NOT_STARTED) -> RunnerOutput:
        out = RunnerOutput()
        sample_rows: list[int] = []
        sample_items: list[ScheduledRequest] = []
        for i, item in enumerate(items):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if item.request.sampling_params.prompt_logprobs is not None and item.start < item.request.num_prompt_tokens:
                out.prompt_logprobs[item.request.request_id] = self._prompt_logprobs(item, hidden, start)
            if item.samples:
                # a speculating sequence samples at its last token and at each of its k drafts
                sample_rows.extend(range(end - 1 - len(item.spec_token_ids), end))
                sample_items.append(item)
        if not sample_rows:
            return out
        logits = self._compute_logits(hidden, sample_rows)
        if masks is _NOT_STARTED:  # a runner whose execute did not start them (tensor parallel): now
            masks = self._begin_masks(items)
        grammar = masks.wait() if isinstance(masks, PendingMasks) else None
        plain = [(j, item) for j, item in enumerate(sample_items) if not item.spec_token_ids]
        offsets, at = [], 0
        for item in sample_items:
            offsets.append(at)
            at += 1 + len(item.spec_token_ids)
        if plain:
            every = len(plain) == len(sample_items) and len(sample_items) == logits.shape[0]
            plain_idx = [offsets[j] for j, _ in plain]
            plain_logits = logits if every else logits[plain_idx]
            plain_grammar = None if grammar is None else grammar if every else grammar[plain_idx]
            rows = [self._sample_row(item, item.request.output_token_ids) for _, item in plain]
            result = self.sampler(plain_logits, rows, plain_grammar)
            for (_, item), token, lp in zip(plain, result.token_ids, result.logprobs):
                rid = item.request.request_id
                out.sampled[rid] = [token]
                if lp is not None:
                    out.logprobs[rid] = [lp]
        for j, item in enumerate(sample_items):
            drafts = item.spec_token_ids
            if not drafts:
                continue
            req = item.request
            generator = self._generator(item)
            rows = [self._sample_row(item, req.output_token_ids + drafts[:d], generator) for d in range(len(drafts) + 1)]
            # each request's rows are its own slice; verify_drafts may modify it in place
            span = slice(offsets[j], offsets[j] + len(drafts) + 1)
            tokens, lps = verify_drafts(logits[span], rows, drafts, None if grammar is None else grammar[span])
            out.sampled[req.request_id] = tokens
            if lps[0] is not None:
                out.logprobs[req.request_id] = lps  # type: ignore[assignment]
        return out

    def _sample_row(self, item: ScheduledRequest, output_token_ids: list[int],
                    generator: torch.Generator | None = None) -> SampleRow:
        req = item.request
        return SampleRow(req.sampling_params, req.prompt_token_ids, output_token_ids,
                         generator if generator is not None else self._generator(item), req.eos_token_ids)

    def logit_rows(self, items: list[ScheduledRequest], meta: AttentionMetadata) -> list[int]:
        """Every row of the flat batch whose logits `_sample` will ask for, sorted (the rows each sampling
        request samples at, and the prompt rows of prompt logprobs)."""
        rows: set[int] = set()
        for i, item in enumerate(items):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if item.request.sampling_params.prompt_logprobs is not None and item.start < item.request.num_prompt_tokens:
                rows.update(range(start, start + self._num_prompt_logprob_rows(item)))
            if item.samples:
                rows.update(range(end - 1 - len(item.spec_token_ids), end))
        return sorted(rows)

    def _compute_logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """fp32 logits of the flat batch's `rows` (a tensor-parallel runner serves them from one gather)."""
        return self.model.compute_logits(hidden[rows])

    @staticmethod
    def _num_prompt_logprob_rows(item: ScheduledRequest) -> int:
        return min(item.num_tokens, item.request.num_prompt_tokens - 1 - item.start)

    def _prompt_logprobs(self, item: ScheduledRequest, hidden: torch.Tensor,
                         start: int) -> list[tuple[int, float, TopLogprobs]]:
        """Logprob of each next prompt token given the tokens before it, for this chunk's rows (from `start`)."""
        req = item.request
        n_top = req.sampling_params.prompt_logprobs or 0
        last_prompt_row = self._num_prompt_logprob_rows(item)
        if last_prompt_row <= 0:
            return []
        logits = self._compute_logits(hidden, list(range(start, start + last_prompt_row)))
        logprobs = torch.log_softmax(logits, dim=-1)
        result = []
        for r in range(last_prompt_row):
            target = req.prompt_token_ids[item.start + r + 1]
            top = torch.topk(logprobs[r], n_top) if n_top else None
            top_list = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            result.append((target, float(logprobs[r, target]), top_list))
        return result
