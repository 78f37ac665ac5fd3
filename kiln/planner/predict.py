"""Speed predictions from a calibration: single-stream decode, prefill and batched decode tok/s.

decode step(B) = weight bytes the step streams x the path's measured seconds per byte at B rows
                 (its effective bandwidth, per-layer kernel work included; interpolated between the
                 calibrated batches of the kernel regime B falls in, the last segment extended beyond)
               + B x context x KV bytes per token / measured read bandwidth
               + the path's measured per-step cost outside the forward: fixed(B), interpolated alike
prefill(T)     = the sum over the scheduler's chunks (--max-num-batched-tokens each) of
                 the measured cost per token and linear parameter x parameters x chunk tokens
               + the measured cost per token pair, layer and query width x layers x width x chunk x the
                 tokens of earlier chunks it attends to
               + the prefill step's measured cost outside the forward

The kernel path follows kiln's own choice: GGUF Q4_0/Q4_1/Q8_0 weights on a CPU with native kernels run
kiln's block kernels (and the fused decode step); anything else runs torch's dense GEMM in the activation
dtype. Invariant: a prediction names the calibration it used; none is made without one.
"""

from __future__ import annotations

from typing import Any

from kiln.planner.memory import NATIVE_BLOCK_TYPES, MemoryPlan, matrix_type


def _lin(fit: list[float], x: int) -> float:
    """A calibrated (intercept, slope) line at x."""
    return fit[0] + fit[1] * x


def _interpolate(points: dict[int, float], x: int) -> float:
    """Piecewise-linear through the measured points, the end segments extended (never below 0)."""
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    i = 1
    while i < len(xs) - 1 and xs[i] < x:
        i += 1
    x0, x1 = xs[i - 1], xs[i]
    return max(0.0, points[x0] + (points[x1] - points[x0]) * (x - x0) / (x1 - x0))


def _regime_points(path: dict[str, Any], rows: int, key: str) -> dict[int, float] | None:
    """The calibrated batches of the kernel regime `rows` falls in (block kernel below `panel_from_rows`,
    panel kernel from it), or None for a calibration without per-batch points."""
    measured = path.get("measured_batches")
    if not measured:
        return None
    split = path.get("panel_from_rows", 1 << 30)
    points = {int(b): v[key] for b, v in measured.items() if (int(b) >= split) == (rows >= split)}
    return points or None


def kernel_path(plan: MemoryPlan, native: bool) -> str:
    """'native_block', 'float32' or 'bfloat16': which calibrated path the planned model runs on."""
    req = plan.request
    if req.device == "cpu" and native and matrix_type(plan.source, req) in NATIVE_BLOCK_TYPES:
        return "native_block"
    return "float32" if req.act_bytes() == 4 else "bfloat16"


def _engine_method() -> Any:
    """The linear method the engine gives a GGUF Q4 layer here (with `kiln tune`'s choices, if any)."""
    from kiln.layers.gguf_quant import GGUFQuantLinearMethod

    return GGUFQuantLinearMethod("Q4", keep_dense=True)


def native_row_limit(act: str) -> int:
    """Most rows kiln runs through its block/panel kernels before the dense GEMM (kiln.layers.gguf_quant)."""
    import torch

    method = _engine_method()
    dtype = torch.float32 if act == "float32" else torch.bfloat16
    return max(method.block_max_rows(dtype), method.panel_max_rows(dtype))


def first_panel_row() -> int | None:
    """The first row count the engine runs through the panel kernel (fp32), or None if it never does."""
    import torch

    method = _engine_method()
    block, panel = method.block_max_rows(torch.float32), method.panel_max_rows(torch.float32)
    return block + 1 if panel > block else None


def dense_copy_path(act: str) -> str:
    """The calibrated path a block layer's dense fallback runs like: fp32 models whose copy `kiln tune` keeps
    in bf16 run their dense GEMMs as the bf16 path does."""
    import torch

    from kiln.kernels.tune import copy_dtype

    if act == "float32" and copy_dtype(_engine_method().tuning, torch.float32) == torch.bfloat16:
        return "bfloat16"
    return act


def _linear_params(plan: MemoryPlan) -> int:
    a = plan.source.arch
    per_layer = a.hidden_size * (a.q_size + 2 * a.kv_size) + a.q_size * a.hidden_size + 3 * a.hidden_size * a.intermediate_size
    return per_layer * a.num_layers


def decode_step_s(plan: MemoryPlan, cal: dict[str, Any], seqs: int, rows: int | None = None,
                  decode_context: int = 256) -> dict[str, float]:
    """Predicted seconds of one decode step of `seqs` sequences computing `rows` rows (rows > seqs when
    verifying drafts), by term."""
    return predict(plan, cal, decode_context=decode_context, concurrency=seqs, rows=rows)["terms_s"]["batched_decode"]


def predict(plan: MemoryPlan, cal: dict[str, Any], prompt_tokens: int = 1024, decode_context: int = 256,
            concurrency: int | None = None, rows: int | None = None) -> dict[str, Any]:
    """tok/s predictions for `plan` on the calibrated machine, each with the terms that make it up."""
    a, req = plan.source.arch, plan.request
    native = bool(cal["machine"].get("native_kernels"))
    path = kernel_path(plan, native)
    act = "float32" if req.act_bytes() == 4 else "bfloat16"
    dense = cal["paths"][act]
    w = plan.whole.weights
    dense_bytes = (_linear_params(plan) + a.vocab_size * a.hidden_size) * req.act_bytes()
    block_bytes = w["attention"] + w["mlp"] + w["embeddings"] + w["lm_head"]
    limit = native_row_limit(act) if path == "native_block" else 0
    if path == "native_block" and dense_copy_path(act) != act:  # the tuned bf16 copy above the limit
        dense = cal["paths"][dense_copy_path(act)]
        dense_bytes = (_linear_params(plan) + a.vocab_size * a.hidden_size) * 2
    kv_token = plan.whole.kv_per_token_bytes
    head_share = a.vocab_size * a.hidden_size / (_linear_params(plan) + a.vocab_size * a.hidden_size)

    def step(b: int, r: int) -> dict[str, float]:
        # kiln's own kernel choice: block kernels up to `limit` rows, the dense GEMM (resident copy) above
        p, nbytes = (cal["paths"]["native_block"], block_bytes) if r <= limit else (dense, dense_bytes)
        per_byte_points, fixed_points = _regime_points(p, r, "s_per_byte"), _regime_points(p, r, "outside_forward_s")
        if per_byte_points and fixed_points:
            per_byte, fixed = _interpolate(per_byte_points, r), _interpolate(fixed_points, b)
        else:  # an older calibration: its fitted lines
            line_b, line_f = p["s_per_byte"], p["fixed_s"]
            if act == "float32" and r >= p.get("panel_from_rows", 1 << 30):  # the panel kernel's regime
                line_b, line_f = p["panel_s_per_byte"], p["panel_fixed_s"]
            per_byte, fixed = _lin(line_b, r), _lin(line_f, b)
        return {"weights": nbytes * per_byte,
                "kv_reads": b * decode_context * kv_token / cal["read_bytes_per_s"],
                "outside forward": max(0.0, fixed)}

    one = step(1, 1)
    conc = concurrency or req.concurrency
    many = step(conc, rows or conc)
    # a prefill chunk has more rows than any block-kernel limit: the dense GEMM, as the calibration's engine of
    # this path ran it (the native path's own prefill: its dense copy, in bf16 where `kiln tune` chose that)
    pf = cal["paths"]["native_block"]["prefill"] if path == "native_block" else dense["prefill"]
    chunk = max(1, req.max_num_batched_tokens)
    prefill_s = step(1, 1)["weights"] * head_share  # the LM head, for the last token only
    for start in range(0, prompt_tokens, chunk):
        n = min(chunk, prompt_tokens - start)
        prefill_s += (pf["fixed_s"] + pf["s_per_token_param"] * _linear_params(plan) * n
                      + pf["s_per_token_pair_layer_q"] * a.num_layers * a.q_size * n * start)

    def why(parts: dict[str, float]) -> str:
        return ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in parts.items())

    return {"path": path, "calibration": f"{cal['machine']['cpu']}, {cal['machine']['threads']} threads, {cal['date']}",
            "concurrency": conc, "prompt_tokens": prompt_tokens, "decode_context": decode_context,
            "decode_tok_s": 1 / sum(one.values()), "prefill_tok_s": prompt_tokens / prefill_s,
            "batched_decode_tok_s": conc / sum(many.values()),
            "terms_s": {"decode": one, "batched_decode": many, "prefill": prefill_s},
            "why": {"decode_tok_s": why(one), "batched_decode_tok_s": why(many),
                    "prefill_tok_s": f"{prefill_s * 1e3:.0f} ms for {prompt_tokens} tokens"}}


def prefill_s(plan: MemoryPlan, cal: dict[str, Any], tokens: int) -> float:
    """Predicted seconds to prefill `tokens` prompt tokens in one chunk."""
    return tokens / predict(plan, cal, prompt_tokens=tokens)["prefill_tok_s"]


__all__ = ["decode_step_s", "kernel_path", "predict", "prefill_s"]
