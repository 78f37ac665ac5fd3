"""The evaluation and benchmark data kiln ships with itself (see DATA.md for sources and licences).

kiln's defaults (`kiln eval ppl`, `kiln quantize`'s calibration text, `kiln bench`'s prompts)
and its tests read these files, so a fresh clone or a wheel install works with nothing beside
it. Names are paths relative to this folder and keep the upstream layout
(`wikitext-2-raw/wiki.test.raw`, ...), so a folder laid out the same way can stand in for it.

Invariants:
- every name in `SHIPPED` exists under `PACKAGE_DIR` (pyproject's package-data installs them;
  a test checks each against the sha256 in DATA.md);
- `$KILN_DATA`, when set, must be a folder; a file found there wins over the shipped copy, and a
  file missing there falls back to the shipped copy (the override adds or replaces, never hides).
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln.errors import KilnError

# pip installs packages as plain files (wheels are unpacked), so a Path beside this module is
# real; importlib.resources would only matter for zip imports, which kiln does not support.
PACKAGE_DIR = Path(__file__).resolve().parent

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"  # perplexity text (llama.cpp / GPTQ / AWQ standard)
CALIBRATION_TEXT = "longdocs/pride_and_prejudice_pg1342.txt"  # GPTQ / AWQ / SmoothQuant; never evaluated on
SHAKESPEARE = "longdocs/tinyshakespeare_input.txt"  # long prompts for prefill and prefix-cache runs
GSM8K_TEST = "prompts/gsm8k_test.jsonl"  # {"question", "answer"} per line
MT_BENCH = "prompts/mt_bench_question.jsonl"  # {"question_id", "category", "turns": [...]} per line
HUMANEVAL = "code/HumanEval.jsonl"  # {"prompt", "canonical_solution", "entry_point", ...} per line

SHIPPED: tuple[str, ...] = (WIKITEXT2_TEST, CALIBRATION_TEXT, SHAKESPEARE, GSM8K_TEST, MT_BENCH, HUMANEVAL)


def override_dir() -> Path | None:
    """The folder named by $KILN_DATA, or None when unset; a KilnError when it names no folder."""
    value = os.environ.get("KILN_DATA")
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        # A typo here would otherwise silently measure on the shipped files instead of the user's.
        raise KilnError(f"KILN_DATA={value} is not a folder; unset it to use the data shipped with kiln")
    return folder


def data_path(name: str) -> Path:
    """The file `name` (e.g. `WIKITEXT2_TEST`): from $KILN_DATA when it has it, else the shipped copy."""
    override = override_dir()
    if override is not None and (override / name).is_file():
        return override / name
    path = PACKAGE_DIR / name
    if not path.is_file():
        known = ", ".join(SHIPPED)
        raise KilnError(f"data file {name!r} is not shipped with kiln (shipped: {known}); "
                        "pass your own file, or put it under a folder named by KILN_DATA")
    return path
