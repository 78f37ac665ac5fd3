"""Decode speed of one greedy stream, run the way a given entry point runs it (a script: each mode
needs a fresh process, since which threads have entered OpenMP is process state).

  python thread_probe.py MODEL serve     # kiln serve's way: AsyncEngine loads and steps on its thread
  python thread_probe.py MODEL offline   # LLM.generate on the main thread
  python thread_probe.py MODEL split     # the old serve: load on the main thread, step on another

Prints one JSON line: {"mode", "decode_tok_s"}; decode speed excludes the first token (prefill).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

TOKENS = 48
PROMPT = "Write a short story about a dragon who learns to bake bread."


def _params():
    from kiln.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)


def _decode_rate(stamps: list[float]) -> float:
    """Tokens per second after the first one (decode only)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def offline(model: str, threads: int) -> float:
    from kiln import LLM

    llm = LLM(model, enable_prefix_caching=False, threads=threads)
    best = 0.0
    for _ in range(3):  # the first run warms up (decode plan, allocator)
        stamps = [time.perf_counter() for out in llm.generate_stream(PROMPT, _params()) if out.outputs[0].delta_token_ids]
        best = max(best, _decode_rate(stamps))
    return best


async def _stream(engine) -> float:
    stamps: list[float] = []
    async for out in engine.generate(PROMPT, _params()):
        if out.outputs[0].delta_token_ids:
            stamps.append(time.perf_counter())
    return _decode_rate(stamps)


def serve(model: str, threads: int, split: bool) -> float:
    from kiln.engine.arg_utils import EngineArgs
    from kiln.engine.async_engine import AsyncEngine
    from kiln.engine.llm_engine import LLMEngine

    args = EngineArgs(model=model, enable_prefix_caching=False, threads=threads)
    if split:  # what kiln serve did before: the main thread loads (and owns an OpenMP team) ...
        engine = LLMEngine.from_engine_args(args)
        engine.add_request(PROMPT, _params())
        engine.run_until_done()  # ... and touches torch, as a warm-up there would
        async_engine = AsyncEngine(engine)
        async_engine.start()
    else:
        async_engine = AsyncEngine.from_engine_args(args)
    try:
        return max(asyncio.run(_stream(async_engine)) for _ in range(3))
    finally:
        async_engine.shutdown(timeout=5)


def main() -> None:
    model, mode = sys.argv[1], sys.argv[2]
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    rate = offline(model, threads) if mode == "offline" else serve(model, threads, split=mode == "split")
    print(json.dumps({"mode": mode, "decode_tok_s": rate, "main_thread_is_engine": mode == "offline",
                      "threads_alive": threading.active_count()}))


if __name__ == "__main__":
    main()
