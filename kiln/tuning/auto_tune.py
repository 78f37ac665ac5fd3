"""The first start on a machine without a `kiln tune` file measures one (issue 21: "at first run").

kiln picks between its block kernel, panel kernel and the dense GEMM by crossovers measured on the machine
it runs on (kiln.kernels.tune). Without a tuning file for this CPU, native build and thread count the
engine falls back to crossovers measured on another CPU, which cost the default model ~40 % of its prefill
speed on the machine this was written on (README, "Kernel choice"). So the engine's first start there
runs one round of `kiln tune` (tens of seconds, said on stderr) and every later start reads the file.

What is timed: the served model's GGUF Q4 linears when it has them, else the default model's if it is
already in the cache; otherwise nothing (a message says how to tune by hand). `--no-auto-tune` or
KILN_NO_AUTO_TUNE=1 skips it; KILN_NO_TUNE=1 (which makes kiln ignore tuning files) skips it too.
Invariant: tuning changes which kernel runs, never what a kernel computes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROUNDS = 1  # `kiln tune` runs 3 (steadier figures); the first start should not take minutes


def _stderr(message: str) -> None:
    print(f"kiln: {message}", file=sys.stderr, flush=True)


def ensure_tuned(model_path: Path, threads: int, log: Callable[[str], None] = _stderr) -> str:
    """Tune this machine if it has no tuning for `threads`; returns 'tuned already', 'tuned now (...)' or
    'not tuned: <why>' (also logged). Never raises: an engine starts on the built-in crossovers whatever
    goes wrong here. Processes starting at once take turns (a file lock); the later ones find the file."""
    from kiln.kernels.native import load_native
    from kiln.kernels.tune import load_tuning

    if os.environ.get("KILN_NO_TUNE"):
        return "not tuned: KILN_NO_TUNE is set (tuning files are ignored)"
    if not load_native():
        return "not tuned: no native kernels here (nothing to choose between)"
    if load_tuning(threads) is not None:
        return "tuned already"
    from kiln.hub import kiln_home
    from kiln.kernels import tune
    from kiln.kernels.build_lock import BuildLock

    try:
        with BuildLock(kiln_home() / "tune"):
            tune._load.cache_clear()  # another process may have saved it while this one waited
            if load_tuning(threads) is not None:
                return "tuned already"
            return _tune(model_path, threads, log)
    except Exception as exc:  # a corrupt cached model, a read-only cache, ...: not a reason to refuse to start
        why = f"not tuned: {type(exc).__name__}: {exc}"
        log(why)
        return why


def _tune(model_path: Path, threads: int, log: Callable[[str], None]) -> str:
    source = _tuning_model(model_path)
    if source is None:
        why = ("not tuned: the model has no GGUF Q4_0/Q4_1 linears to time and the default model is not in the "
               "cache; run `kiln tune` once for this machine's kernel crossovers")
        log(why)
        return why
    from kiln.tuning.kernel_tune import measure

    log(f"first start on this CPU / build / {threads} threads: timing kernel paths once to pick the fastest per "
        f"batch size (`kiln tune` re-runs it; --no-auto-tune skips) ...")
    start = time.perf_counter()
    try:
        measure(str(source), threads, ROUNDS)
    except RuntimeError as exc:  # e.g. no Q4 linears after all: run on the built-in crossovers
        why = f"not tuned: {exc}"
        log(why)
        return why
    done = f"tuned now ({time.perf_counter() - start:.0f} s, on {source.name}); saved for later starts"
    log(done)
    return done


def _tuning_model(model_path: Path) -> Path | None:
    """A GGUF with Q4_0/Q4_1 linears to time: the served model, else the cached default model."""
    if model_path.is_file() and _has_q4_linears(model_path):
        return model_path
    from kiln.hub import DEFAULT_MODEL, model_path as registered_path

    default = registered_path(DEFAULT_MODEL)
    return default if default.is_file() else None


def _has_q4_linears(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path, "r")
    except Exception:  # not a GGUF the library reads: the loader will say why
        return False
    return any(t.tensor_type.name in ("Q4_0", "Q4_1") and len(t.shape) == 2 and t.name.startswith("blk.")
               for t in reader.tensors)
