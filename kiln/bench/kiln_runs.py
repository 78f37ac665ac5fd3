"""kiln's side of the benchmarks (module-level functions so they can run in a child process).

They drive an LLMEngine directly (built from EngineArgs, on the calling thread, as `LLM` does), so
kiln.bench depends on the engine and not on kiln.entrypoints, whose `kiln bench` command calls it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.engine.llm_engine import LLMEngine
    from kiln.outputs import RequestOutput
    from kiln.sampling_params import SamplingParams


def _engine(model: str, dtype: str, engine_kwargs: dict[str, Any]) -> "LLMEngine":
    from kiln.engine.arg_utils import EngineArgs
    from kiln.engine.llm_engine import LLMEngine

    return LLMEngine.from_engine_args(EngineArgs.from_kwargs(model=model, dtype=dtype, **engine_kwargs))


def _generate(engine: "LLMEngine", prompts: list[list[int]], params: "SamplingParams") -> list["RequestOutput"]:
    """Every prompt to completion, continuously batched; outputs in the order of `prompts`."""
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    final = engine.run_until_done()
    return [final[i] for i in ids]


def _stream_times(engine: "LLMEngine", prompt: list[int], params: "SamplingParams") -> list[float]:
    """When each of the (one) request's tokens was ready: the end of the step that made it (a step may
    make several — a multi-step trip, accepted drafts — and then they share its time)."""
    engine.add_request({"prompt_token_ids": prompt}, params)
    times: list[float] = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        times.extend(now for out in outputs for _ in out.outputs[0].delta_token_ids)
    return times


def _warm_up(engine: "LLMEngine", prompt: list[int]) -> None:
    from kiln.sampling_params import SamplingParams

    _generate(engine, [prompt], SamplingParams(temperature=0, max_tokens=4))


def _weights(engine: "LLMEngine") -> str:
    """'torch.bfloat16' or e.g. 'Q4_1/Q8_0 blocks, bf16 activations' for the system label."""
    model = engine.loaded.model
    types = sorted({t for m in model.modules() for t in getattr(getattr(m, "method", None), "source_types", ())})
    act = str(model.dtype).removeprefix("torch.")
    label = f"{'/'.join(types)} native kernels, {act} activations" if types else act
    spec = engine.speculative_config
    return label + (f", {spec.method} speculation k={spec.num_speculative_tokens}" if spec else "")


def _spec_stats(engine) -> dict[str, Any]:
    """Speculative decoding figures (empty when it is off): acceptance rate and tokens per step."""
    if engine.spec is None:
        return {}
    s = engine.stats()
    spec = s.spec
    return {"speculative": engine.spec.config.method,
            "spec_acceptance_rate": spec.acceptance_rate,
            "spec_mean_accepted_per_step": spec.accepted_total / spec.steps_total if spec.steps_total else None,
            "spec_draft_seconds": spec.draft_seconds_total,
            "spec_skipped_steps": spec.skipped_steps_total, "engine_steps": s.step_count}


def kiln_throughput(model: str, dtype: str, prompts: list[list[int]], max_tokens: int,
                    engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from kiln.sampling_params import SamplingParams

    engine = _engine(model, dtype, engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    _warm_up(engine, prompts[0])
    engine.kv_manager.reset_prefix_cache()
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
        "system": f"kiln ({_weights(engine)}, continuous batching)",
        "elapsed_s": elapsed,
        "output_tokens": generated,
        "kv_blocks_peak": peak_blocks,
        "kv_blocks_total": engine.kv_budget.num_blocks,
        "steps": stats.step_count,
        "preemptions": stats.scheduler.num_preemptions_total,
        "ttft_mean_s": sum(ttfts) / max(len(ttfts), 1),
        **_spec_stats(engine),
    }


def kiln_latency(model: str, dtype: str, prompt: list[int], long_prompt: list[int], max_tokens: int,
                 engine_kwargs: dict[str, Any], profile: bool = False) -> dict[str, Any]:
    from kiln.sampling_params import SamplingParams

    engine_kwargs = dict(engine_kwargs, enable_prefix_caching=False, max_num_batched_tokens=max(2048, len(long_prompt)))
    engine = _engine(model, dtype, engine_kwargs)
    _warm_up(engine, prompt)
    start = time.perf_counter()
    _generate(engine, [long_prompt], SamplingParams(temperature=0, max_tokens=1))
    prefill = len(long_prompt) / (time.perf_counter() - start)
    times = _stream_times(engine, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    decode = (len(times) - 1) / (times[-1] - times[0])
    result: dict[str, Any] = {"system": f"kiln ({_weights(engine)})", "prefill_tok_s": prefill, "decode_tok_s": decode,
                              **_spec_stats(engine)}
    if profile:  # after the timed runs, so the profiler's overhead never enters the figures
        from kiln.bench.profile import profile_engine

        result["profile"] = profile_engine(engine, prompt, long_prompt)
    return result


def kiln_generate_timed(model: str, dtype: str, prompts: list[list[int]], max_tokens: int,
                        engine_kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Greedy generation of every prompt, `batch` at a time; output tok/s over the whole set.

    Returns the token ids too, so a caller can check that speculation changed nothing."""
    from kiln.sampling_params import SamplingParams

    engine = _engine(model, dtype, engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    _warm_up(engine, prompts[0])
    outputs: list[list[int]] = []
    draft_before = engine.stats().spec.draft_seconds_total
    decode_tokens, decode_seconds = 0, 0.0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = _generate(engine, prompts[i:i + batch], params)
        outputs.extend(o.outputs[0].token_ids for o in group)
        # decode window of the group: from its last first token to its end (prefill excluded)
        firsts = [o.metrics.first_token_time for o in group if o.metrics and o.metrics.first_token_time]
        ends = [o.metrics.finished_time for o in group if o.metrics and o.metrics.finished_time]
        if firsts and ends:
            decode_seconds += max(ends) - max(firsts)
            decode_tokens += sum(max(len(o.outputs[0].token_ids) - 1, 0) for o in group)
    elapsed = time.perf_counter() - start
    generated = sum(map(len, outputs))
    stats = _spec_stats(engine)
    if stats:
        stats["spec_draft_time_share"] = (stats["spec_draft_seconds"] - draft_before) / elapsed
    decode = {"decode_tok_s": decode_tokens / decode_seconds} if decode_seconds > 0 else {}
    return {"system": f"kiln ({_weights(engine)})", "batch": batch, "elapsed_s": elapsed, "output_tokens": generated,
            "output_tok_s": generated / elapsed, **decode, "token_ids": outputs, **stats}
