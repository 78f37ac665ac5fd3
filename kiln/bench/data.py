"""Benchmark prompts from the data shipped with kiln (`kiln.data`; sources and licences in its DATA.md)."""

from __future__ import annotations

import json

from kiln.data import GSM8K_TEST, SHAKESPEARE, data_path
from kiln.errors import KilnError


def gsm8k_questions(n: int) -> list[str]:
    """The first `n` GSM8K test questions (a KilnError when the file holds fewer)."""
    path = data_path(GSM8K_TEST)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    if len(rows) < n:
        raise KilnError(f"{path} has only {len(rows)} questions; asked for {n}")
    return [r["question"] for r in rows]


def long_text(num_chars: int) -> str:
    """The first `num_chars` characters of Tiny Shakespeare (long prompts for prefill / prefix caching)."""
    return data_path(SHAKESPEARE).read_text(encoding="utf-8")[:num_chars]
