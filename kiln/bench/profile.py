"""`kiln bench latency --profile`: where one decode step and one prefill chunk spend their time.

Runs the engine under torch.profiler and splits each step's wall time into op families (the
leaf ops' self time: quantized and dense matmuls, attention, fused norm/activation/RoPE, KV
writes, ...) and engine regions labelled with `record_function` (scheduling, input
preparation, output processing). What no op accounts for is Python and dispatch overhead.
"""

from __future__ import annotations

import time
from typing import Any

# op name → family; only leaf ops, so self times add up without double counting
OP_FAMILIES: dict[str, str] = {
    "kiln::quant_matmul": "matmul: quantized block kernel",
    "kiln::quant_matmul_panels": "matmul: panel kernel",
    "kiln::quant_dequantize": "matmul: dequantize for dense GEMM",
    "kiln::quant_matmul_q5": "matmul: quantized block kernel",
    "kiln::quant_matmul_panels_q5": "matmul: panel kernel",
    "kiln::quant_dequantize_q5": "matmul: dequantize for dense GEMM",
    "kiln::kquant_matmul": "matmul: quantized block kernel",
    "kiln::kquant_matmul_panels": "matmul: panel kernel",
    "kiln::kquant_dequantize": "matmul: dequantize for dense GEMM",
    "kiln::dense_matmul": "matmul: dense decode kernel",
    "aten::mm": "matmul: dense GEMM/GEMV",
    "aten::addmm": "matmul: dense GEMM/GEMV",
    "mkldnn::_linear_pointwise": "matmul: dense GEMM/GEMV",
    "aten::bmm": "attention",
    "kiln::paged_decode_attention": "attention",
    "kiln::paged_decode_attention_quant": "attention",
    "kiln::paged_decode_attention_window": "attention",
    "kiln::paged_prefill_attention": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_softmax": "attention",
    "kiln::add_rms_norm": "norm / SiLU·gate / RoPE (fused)",
    "kiln::silu_and_mul": "norm / SiLU·gate / RoPE (fused)",
    "aten::silu": "norm / SiLU·gate / RoPE (fused)",
    "kiln::rope_qkv_": "norm / SiLU·gate / RoPE (fused)",
    "aten::index_copy_": "KV cache write",
    "kiln::write_kv_quant": "KV cache write",
    "aten::embedding": "embedding",
    "aten::index_select": "embedding",
}
REGIONS = ("kiln::schedule", "kiln::prepare_inputs", "kiln::logits_and_sample", "kiln::process_outputs")


def breakdown(prof: Any, steps: int, wall_s: float) -> dict[str, Any]:
    """Milliseconds per step by op family and by engine region, plus the unattributed rest."""
    families: dict[str, float] = {}
    regions: dict[str, float] = {}
    for evt in prof.key_averages():
        family = OP_FAMILIES.get(evt.key)
        if family is not None:
            families[family] = families.get(family, 0.0) + evt.self_cpu_time_total / 1e3 / steps
        if evt.key in REGIONS:
            regions[evt.key.removeprefix("kiln::")] = evt.cpu_time_total / 1e3 / steps
    step_ms = wall_s * 1e3 / steps
    ops_ms = sum(families.values())
    return {
        "step_ms": step_ms,
        "op_families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "engine_regions_ms": regions,
        "other_ops_python_dispatch_ms": step_ms - ops_ms,
    }


def profile_engine(engine: Any, prompt: list[int], long_prompt: list[int], decode_steps: int = 32) -> dict[str, Any]:
    """Profile `engine` (an LLMEngine, driven on this thread): decode steps, then a long prefill."""
    from torch.profiler import ProfilerActivity, profile

    from kiln.sampling_params import SamplingParams

    engine.add_request({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=decode_steps + 8, ignore_eos=True))
    for _ in range(4):  # prefill + warm decode steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        tokens = 0  # one decode step per token (an engine step may run several: a multi-step trip)
        while tokens < decode_steps and engine.has_unfinished_requests():
            tokens += sum(len(o.outputs[0].delta_token_ids) for o in engine.step())
        wall = time.perf_counter() - start
    decode = breakdown(prof, tokens, wall)
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request({"prompt_token_ids": long_prompt}, SamplingParams(temperature=0, max_tokens=1))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        wall = time.perf_counter() - start
    prefill = breakdown(prof, steps, wall)
    prefill["tokens_per_step"] = len(long_prompt) / steps
    return {"decode_step": decode, "prefill_chunk": prefill}


def format_profile(p: dict[str, Any]) -> str:
    lines = []
    for name, d in p.items():
        extra = f", {d['tokens_per_step']:.0f} tokens" if "tokens_per_step" in d else ""
        lines.append(f"{name.replace('_', ' ')}: {d['step_ms']:.2f} ms{extra}")
        for fam, ms in d["op_families_ms"].items():
            lines.append(f"  {fam:40s} {ms:8.2f} ms  {100 * ms / d['step_ms']:5.1f}%")
        lines.append(f"  {'other ops, Python, dispatch':40s} {d['other_ops_python_dispatch_ms']:8.2f} ms  "
                     f"{100 * d['other_ops_python_dispatch_ms'] / d['step_ms']:5.1f}%")
        regions = ", ".join(f"{k} {v:.2f}" for k, v in d["engine_regions_ms"].items())
        lines.append(f"  (engine regions, ms, overlapping the above: {regions})")
    return "\n".join(lines)
