"""Where the benchmark result files live and how a report reads one: shared by every README renderer.

The files live in the source checkout (benchmarks/results/), not in the installed package: an install
without them renders "_not measured yet_" for every table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def load_result(name: str) -> dict[str, Any] | None:
    """benchmarks/results/NAME.json, or None when it is not there."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
