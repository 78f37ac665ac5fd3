"""The request mixes `kiln advise` profiles: chat, code, rag (from the data kiln ships) or a JSONL file.

Each workload is a list of (chat messages, max new tokens). chat: MT-Bench first turns; code: HumanEval
functions to repeat with a new name (output copies the prompt, as code editing does); rag: one shared
2,000-character Shakespeare passage plus a different question per request (a shared prefix, short
answers). A FILE.jsonl holds one object per line: {"prompt": str} or {"messages": [...]}, and optionally
"max_tokens".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError

WORKLOADS = ("chat", "code", "rag")


@dataclass(frozen=True)
class WorkItem:
    messages: tuple[dict[str, str], ...]
    max_tokens: int


def _rows(name: str) -> list[dict]:
    from kiln.data import data_path

    with open(data_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _user(text: str, max_tokens: int) -> WorkItem:
    return WorkItem(({"role": "user", "content": text},), max_tokens)


def load_workload(name: str, n: int, max_tokens: int = 64) -> list[WorkItem]:
    """`n` requests of workload `name` (cycled when the source holds fewer)."""
    from kiln.data import HUMANEVAL, MT_BENCH, SHAKESPEARE, data_path

    if name == "chat":
        items = [_user(r["turns"][0], max_tokens) for r in _rows(MT_BENCH)]
    elif name == "code":
        items = [_user(f"Here is a Python function:\n\n```python\n{r['prompt']}{r['canonical_solution']}```\n\n"
                       f"Repeat this code exactly, but rename `{r['entry_point']}` to `solution`.", max_tokens)
                 for r in _rows(HUMANEVAL)]
    elif name == "rag":
        doc = data_path(SHAKESPEARE).read_text(encoding="utf-8")[:2000]
        questions = ["Who speaks first?", "What do the citizens want?", "Who is Caius Marcius?",
                     "What is said about corn?", "Summarise the passage.", "Which characters appear?",
                     "What is the mood?", "Quote one line about the senate."]
        items = [_user(f"Read this passage:\n\n{doc}\n\nQuestion: {q}", max_tokens // 2) for q in questions]
    else:
        items = _from_file(Path(name), max_tokens)
    if not items:
        raise KilnError(f"workload {name!r} has no requests")
    return [items[i % len(items)] for i in range(n)]


def _from_file(path: Path, max_tokens: int) -> list[WorkItem]:
    if not path.is_file():
        raise KilnError(f"--workload must be {', '.join(WORKLOADS)} or a .jsonl file; {path} is neither")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            msgs = tuple({"role": m["role"], "content": m["content"]} for m in row["messages"])
        elif "prompt" in row:
            msgs = ({"role": "user", "content": str(row["prompt"])},)
        else:
            raise KilnError(f"{path}:{i}: each line needs 'prompt' or 'messages'")
        out.append(WorkItem(msgs, int(row.get("max_tokens", max_tokens))))
    return out
