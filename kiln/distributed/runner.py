"""Rank 0's model runner under tensor parallel: one broadcast per step, then the same forward everywhere.

The scheduler and the block tables stay on rank 0. Each step it broadcasts the flat batch (token ids,
positions, the attention metadata built from the block tables) and the rows that need logits; every
rank runs the forward over its share and computes its vocabulary range of those rows' logits, which
one all-gather assembles; rank 0 samples from them exactly as a one-process runner does (same sampler,
same per-request seeded generators), so sampling does not depend on the TP size.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kiln.core.scheduler import SchedulerOutput
from kiln.distributed.comm import TensorParallelError, TPGroup, describe
from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.models.architecture import CausalLM
from kiln.worker.model_runner import ModelRunner, RunnerOutput

if TYPE_CHECKING:
    from kiln.distributed.engine import RankProcesses


@dataclass(frozen=True, slots=True)
class StepInputs:
    """Everything a worker needs for one step (CPU tensors; a worker moves them to its device)."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: list[int]


@dataclass(frozen=True, slots=True)
class CacheSetup:
    """The KV cache every rank allocates (its own heads of it), sent once before the first step."""

    num_blocks: int
    block_size: int
    kv_cache_dtype: str


class TPModelRunner(ModelRunner):
    """A ModelRunner whose forward and logits are collective over the tensor-parallel group."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto",
                 kv_groups: list | None = None, *, group: TPGroup, processes: RankProcesses | None = None) -> None:
        if kv_groups is not None:
            raise ValueError("tensor parallel does not run hybrid (sliding-window) KV caches yet; "
                             "use --tensor-parallel-size 1 for this model")
        super().__init__(model, num_blocks, block_size, kv_cache_dtype)
        self._healthy = [True]  # shared with the finalizer: no stop message into a broken group
        self.group, self.processes = group, processes
        self.failed: str | None = None
        self._logits: torch.Tensor | None = None
        self._row_at: dict[int, int] = {}
        self._collective(lambda: group.broadcast(CacheSetup(num_blocks, block_size, kv_cache_dtype)))
        # An engine nobody closes still stops its other ranks (they would wait for the next step forever)
        # once it is garbage or the interpreter exits; the finalizer holds no reference to the runner.
        self._stop = weakref.finalize(self, _stop_ranks, group, processes, self._healthy)

    @torch.inference_mode()
    def supports_multi_step(self) -> bool:
        """Multi-step trips run on one process only; the ranks take one broadcast step at a time."""
        return False

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        items, ids, pos, meta = self._prepare(sched)
        rows = self.logit_rows(items, meta)

        def forward() -> torch.Tensor:
            self.group.broadcast(StepInputs(ids.cpu(), pos.cpu(), meta_to(meta, torch.device("cpu")), rows))
            hidden = self.model(ids, pos, meta, self.kv_caches)
            self._logits = self.model.compute_logits(hidden[rows]) if rows else None
            return hidden

        hidden = self._collective(forward)
        self._row_at = {r: j for j, r in enumerate(rows)}
        return self._sample(items, meta, hidden)

    def _compute_logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        assert self._logits is not None
        return self._logits[[self._row_at[r] for r in rows]]

    def _collective(self, fn):  # type: ignore[no-untyped-def]
        """Run `fn` (which talks to the other ranks); a failure of the group becomes one clear error, and
        every later step fails the same way at once (a rank that died does not come back)."""
        if self.failed is not None:
            raise TensorParallelError(self.failed)
        try:
            return fn()
        except (RuntimeError, ConnectionError) as exc:
            if not _is_comm_failure(exc):
                raise
            self.failed = self._why_failed(exc)
            self._healthy[0] = False
            raise TensorParallelError(self.failed) from exc

    def _why_failed(self, exc: BaseException) -> str:
        dead = self.processes.dead() if self.processes is not None else []
        who = ", ".join(f"rank {r} (exit code {code})" for r, code in dead) or "a rank"
        return (f"tensor-parallel {who} stopped ({describe(exc)}); this engine cannot continue: restart it "
                f"(its {self.group.world} ranks hold one model together)")

    def close(self) -> None:
        """Tell the workers to stop, wait for them (killing any that hang), leave the group. Idempotent."""
        self._stop()


def _stop_ranks(group: TPGroup, processes: RankProcesses | None, healthy: list[bool]) -> None:
    if healthy[0]:
        try:
            group.broadcast(None)
        except (RuntimeError, ConnectionError):
            pass
    if processes is not None:
        processes.stop()
    group.leave()


def _is_comm_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, (ConnectionError, dist.DistError)):
        return True
    text = str(exc).lower()
    return any(k in text for k in ("gloo", "connection", "nccl", "timed out", "peer", "socket"))


def meta_to(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """The same metadata with its tensors on `device` (itself when they are there already)."""
    if meta.slot_mapping.device == device:
        return meta
    return AttentionMetadata(meta.slot_mapping.to(device), meta.query_start_loc, meta.seq_lens,
                             meta.block_tables.to(device), meta.num_decodes, meta.seq_lens_tensor.to(device),
                             meta.block_size)
