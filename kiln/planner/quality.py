"""Quality costs from kiln's own measured result tables (never a guess).

Weight types: benchmarks/results/quant_quality.json (mean KL and top-1 agreement against the default GGUF
on WikiText-2). KV cache types: benchmarks/results/plan_advise.json's `kv_quality` (next-token KL of an
int8/fp8 cache against the full-precision cache, measured by benchmarks/plan_advise.py). Both are
measurements of the default model; a type no table holds reports None ("not measured"), and the figures
say nothing certain about another model. The tables live in a source checkout; an installed kiln
without them reports every cost as not measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# --weights choice → the quant_quality.json row that measured it (kiln quantize's defaults for that type)
_WEIGHT_ROWS = {"int8": "RTN int8 per-channel", "fp8": "FP8 E4M3 per-channel", "int4": "RTN int4 g128"}


@dataclass(frozen=True)
class QualityCost:
    """Measured cost of one change: mean KL (nats) and top-1 agreement vs the reference, and where from."""

    kl: float
    top1: float | None
    source: str

    def describe(self) -> str:
        top1 = f", top-1 {100 * self.top1:.1f} %" if self.top1 is not None else ""
        return f"KL {self.kl:.4f}{top1} ({self.source})"


@cache
def _load(name: str, root: str) -> dict[str, Any] | None:
    path = Path(root) / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def weight_cost(weights: str, root: Path = RESULTS) -> QualityCost | None:
    """The measured cost of storing the default model's weights as `weights`, or None if not measured."""
    row_name = _WEIGHT_ROWS.get(weights)
    table = _load("quant_quality", str(root))
    if row_name is None or table is None:
        return None
    for row in table.get("results", []):
        if row.get("method") == row_name and "kl_mean" in row:
            return QualityCost(row["kl_mean"], row.get("top1_agreement"), f"quant_quality.json: {row_name}")
    return None


def kv_cost(kv_cache_dtype: str, root: Path = RESULTS) -> QualityCost | None:
    """The measured cost of an int8/fp8 KV cache on the default model, or None if not measured."""
    table = _load("plan_advise", str(root))
    row = (table or {}).get("kv_quality", {}).get(kv_cache_dtype)
    if not row:
        return None
    return QualityCost(row["kl"], row.get("top1"), f"plan_advise.json: {kv_cache_dtype} KV cache")
