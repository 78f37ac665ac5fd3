"""When a plan does not fit: the cheapest changes that make it fit, each with its measured quality cost.

Each candidate is one change to the request (a lower weight type, an int8/fp8 KV cache, a shorter
context, fewer concurrent sequences, tensor parallelism), re-planned with the same arithmetic; only
changes that fit are returned, cheapest first: no quality cost before a measured one before an
unmeasured one, then by memory left over. Offloading is listed as not available (kiln has none yet).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kiln.planner.formats import matrix_bytes, weight_format
from kiln.planner.memory import (
    MemoryPlan,
    ModelSource,
    PlanRequest,
    matrix_type,
    plan_memory,
)
from kiln.planner.quality import QualityCost, kv_cost, weight_cost

# weight types to try, larger to smaller (kiln can run or produce each one)
_WEIGHT_LADDER = ("bf16", "int8", "q8_0", "fp8", "q4_k_m", "int4", "q4_1", "q4_0")


@dataclass(frozen=True)
class Fix:
    """One change that makes the plan fit, its per-rank total, and what it costs."""

    change: str
    settings: dict[str, Any]
    total_bytes: int
    quality: QualityCost | None
    cost: str  # in words: the quality cost, or the capacity given up

    def as_dict(self) -> dict[str, Any]:
        return {"change": self.change, "settings": self.settings, "total_bytes": self.total_bytes,
                "quality_kl": self.quality.kl if self.quality else None,
                "quality_top1": self.quality.top1 if self.quality else None, "cost": self.cost}


def _try(source: ModelSource, req: PlanRequest, memory: int, draft_bytes: int) -> MemoryPlan | None:
    plan = plan_memory(source, req, draft_bytes)
    return plan if plan.per_rank.total_bytes <= memory else None


def _bytes_per_weight(t: str) -> float:
    return matrix_bytes(t, 4096, 4096) / 4096 ** 2


def fixes(source: ModelSource, req: PlanRequest, memory: int, draft_bytes: int = 0) -> list[Fix]:
    """Single changes to `req` that fit `memory` per rank, cheapest first."""
    found: list[tuple[tuple[int, float], Fix]] = []

    def add(change: str, new: PlanRequest, quality: QualityCost | None, cost: str, rank: int) -> None:
        plan = _try(source, new, memory, draft_bytes)
        if plan is None:
            return
        settings = {k: v for k, v in vars(new).items() if getattr(req, k) != v}
        fix = Fix(change, settings, plan.per_rank.total_bytes, quality, cost)
        found.append(((rank, quality.kl if quality else 0.0), fix))

    current = _bytes_per_weight(matrix_type(source, req))
    for w in _WEIGHT_LADDER:  # only types smaller than what is planned now
        if _bytes_per_weight(weight_format(w).matrix) < current:
            q = weight_cost(w)
            add(f"weights {w}", replace(req, weights=w), q, q.describe() if q else "quality not measured by kiln",
                1 if q else 2)
    for kv in ("int8", "fp8_e4m3"):
        if req.kv_cache_dtype not in ("int8", "fp8_e4m3"):
            q = kv_cost(kv)
            add(f"KV cache {kv}", replace(req, kv_cache_dtype=kv), q, q.describe() if q else "quality not measured by kiln",
                1 if q else 2)
    ctx = req.context or source.arch.max_context
    while ctx > 256:
        ctx //= 2
        if _try(source, replace(req, context=ctx), memory, draft_bytes):
            add(f"context {ctx}", replace(req, context=ctx), None, f"prompts + outputs over {ctx} tokens refused", 0)
            break
    conc = req.concurrency
    while conc > 1:
        conc = max(1, conc // 2)
        if _try(source, replace(req, concurrency=conc), memory, draft_bytes):
            add(f"concurrency {conc}", replace(req, concurrency=conc), None,
                f"{conc} sequences at once instead of {req.concurrency}: more queueing", 0)
            break
    for tp in (2, 4, 8, 16):
        if tp > req.tensor_parallel_size and _try(source, replace(req, tensor_parallel_size=tp), memory, draft_bytes):
            add(f"tensor parallel {tp}", replace(req, tensor_parallel_size=tp), None,
                f"{tp} devices of this size instead of {req.tensor_parallel_size}", 0)
            break
    return [f for _, f in sorted(found, key=lambda x: x[0])]
