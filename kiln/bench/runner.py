"""Run one benchmarked system in a fresh process, so peak RSS and threads are its own."""

from __future__ import annotations

import multiprocessing as mp
import resource
from collections.abc import Callable
from typing import Any


def _child(fn: Callable[..., dict[str, Any]], args: tuple, threads: int, queue) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
        result = fn(*args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put(result)
    except BaseException as exc:  # report, don't hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(fn: Callable[..., dict[str, Any]], *args: Any, threads: int = 2) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result
