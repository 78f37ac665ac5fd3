"""Per-request state owned by the scheduler. Pure Python: no tensors here."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kiln.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort", 6: "error"}.get(int(self))


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated.

    Invariants: all_token_ids == prompt_token_ids + output_token_ids (final tokens only,
    never speculative drafts); 0 <= num_computed_tokens <= num_tokens, except inside one engine
    step, between `Scheduler.update_from_output` counting accepted drafts as computed and the
    output processor appending them. Who writes what: the scheduler `num_computed_tokens`,
    `status` and `spec_token_ids` (the SpecDecoder proposes the drafts); the output processor
    the output tokens and their times. When a request stops is decided in
    kiln.engine.output_processor, which reads `eos_token_ids` and `max_model_len` from here.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    max_model_len: int = 1 << 30
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    cache_salt: object | None = None
    lora_id: int = 0  # the LoRA adapter it runs with (kiln.lora.manager ids; 0: the base model)
    spec_token_ids: list[int] = field(default_factory=list)
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(self.arrival_time)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
