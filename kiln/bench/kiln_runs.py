"""kiln's side of the benchmarks (module-level functions so they can run in a child process)."""

from __future__ import annotations

import time
from typing import Any


def _llm(model: str, dtype: str, engine_kwargs: dict[str, Any]):
    from kiln.entrypoints.llm import LLM

    return LLM(model, dtype=dtype, **engine_kwargs)


def _weights(llm) -> str:
    """'torch.bfloat16' or e.g. 'Q4_1/Q8_0 blocks, bf16 activations' for the system label."""
    model = llm.engine.loaded.model
    types = sorted({t for m in model.modules() for t in getattr(getattr(m, "method", None), "source_types", ())})
    act = str(model.dtype).removeprefix("torch.")
    return f"{'/'.join(types)} native kernels, {act} activations" if types else act


def kiln_throughput(model: str, dtype: str, prompts: list[list[int]], max_tokens: int,
                    engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from kiln.sampling_params import SamplingParams

    llm = _llm(model, dtype, engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    llm.engine.kv_manager.reset_prefix_cache()
    engine = llm.engine
    peak_blocks = 0
    ttfts: list[float] = []
    start = time.perf_counter()
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
                if out.metrics and out.metrics.ttft is not None:
                    ttfts.append(out.metrics.ttft)
        used = engine.kv_manager.num_blocks - engine.kv_manager.get_num_free_blocks()
        peak_blocks = max(peak_blocks, used)
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    return {
        "system": f"kiln ({_weights(llm)}, continuous batching)",
        "elapsed_s": elapsed,
        "output_tokens": generated,
        "kv_blocks_peak": peak_blocks,
        "kv_blocks_total": engine.kv_budget.num_blocks,
        "steps": stats.step_count,
        "preemptions": stats.scheduler.num_preemptions_total,
        "ttft_mean_s": sum(ttfts) / max(len(ttfts), 1),
    }


def kiln_latency(model: str, dtype: str, prompt: list[int], long_prompt: list[int], max_tokens: int,
                 engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from kiln.sampling_params import SamplingParams

    engine_kwargs = dict(engine_kwargs, enable_prefix_caching=False, max_num_batched_tokens=max(2048, len(long_prompt)))
    llm = _llm(model, dtype, engine_kwargs)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": long_prompt}], SamplingParams(temperature=0, max_tokens=1))
    prefill = len(long_prompt) / (time.perf_counter() - start)
    times: list[float] = []
    for out in llm.generate_stream({"prompt_token_ids": prompt},
                                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)):
        times.append(time.perf_counter())
    decode = (len(times) - 1) / (times[-1] - times[0])
    return {"system": f"kiln ({_weights(llm)})", "prefill_tok_s": prefill, "decode_tok_s": decode}
