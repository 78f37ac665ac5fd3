"""Benchmark prompts from the shared evaluation data (never copied into the repo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.errors import KilnError


def data_dir() -> Path:
    """$KILN_DATA, else ../shared/data relative to the working directory or to the repo."""
    candidates = [os.environ.get("KILN_DATA"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[3] / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    raise KilnError("evaluation data not found: set KILN_DATA to the shared/data folder")


def gsm8k_questions(n: int) -> list[str]:
    path = data_dir() / "prompts" / "gsm8k_test.jsonl"
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    if len(rows) < n:
        raise KilnError(f"{path} has only {len(rows)} questions; asked for {n}")
    return [r["question"] for r in rows]


def long_text(num_chars: int) -> str:
    text = (data_dir() / "longdocs" / "tinyshakespeare_input.txt").read_text()
    return text[:num_chars]
