"""`kiln plan`: the budget, the verdict against a memory size, the fixes and (calibrated) speed predictions.

Kept apart from the argparse wiring (kiln/entrypoints/cli_plan.py) so tests and benchmarks call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.planner.fits import fixes
from kiln.planner.memory import MemoryPlan, PlanRequest, plan_memory
from kiln.planner.sources import resolve_source


@dataclass
class PlanResult:
    plan: MemoryPlan
    memory: int | None
    fits: bool | None
    fixes: list[Any]
    prediction: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        """The `kiln plan --json` object: weights_bytes, kv_cache_bytes, activations_bytes, total_bytes, fits,
        per_rank (the same keys for one rank), plus the breakdowns, fixes and predictions."""
        d = self.plan.as_dict()
        d["memory_bytes"] = self.memory
        d["fits"] = self.fits
        d["fixes"] = [f.as_dict() for f in self.fixes]
        d["prediction"] = self.prediction
        return d


def default_memory(device: str) -> int | None:
    """This machine's memory for the verdict: available RAM on the CPU, free memory of GPU 0 on CUDA."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    from kiln.engine.kv_budget import available_memory_bytes

    return available_memory_bytes()


def draft_model_bytes(draft: str | None, req: PlanRequest, context: int) -> int:
    """A separate draft model's weights (its own types) and KV cache at the same context and concurrency."""
    if draft is None or draft == "ngram" or draft.startswith("self:"):
        return 0
    from dataclasses import replace

    sub = plan_memory(resolve_source(draft), replace(req, weights="file", draft=None, context=context,
                                                     tensor_parallel_size=1))
    return sub.whole.weights_bytes + sub.whole.kv_cache_bytes


def run_plan(model: str, req: PlanRequest, memory: int | None, draft: str | None = None,
             calibration: dict[str, Any] | None = None) -> PlanResult:
    source = resolve_source(model)
    context = req.context or source.arch.max_context
    own_draft = draft if draft in (None, "ngram") or (draft or "").startswith("self:") else None
    from dataclasses import replace

    req = replace(req, draft=own_draft)
    extra = draft_model_bytes(draft, req, context)
    plan = plan_memory(source, req, extra)
    if memory is None:
        memory = default_memory(req.device)
    fits = None if memory is None else plan.per_rank.total_bytes <= memory
    found = fixes(source, plan.request, memory, extra) if fits is False else []
    prediction = None
    if calibration is not None:
        from kiln.planner.predict import predict

        prediction = predict(plan, calibration)
    return PlanResult(plan, memory, fits, found, prediction)
