"""Speed predictions from a calibration: single-stream decode, prefill and batched decode tok/s.

decode step(B) = weight bytes the step streams x the path's measured seconds per byte at B rows
                 (its effective bandwidth, per-layer kernel work included)
               + B x context x KV bytes per token / measured read bandwidth
               + the path's measured per-step cost outside the forward: fixed(B)
prefill(T)     = the measured cost per token and linear parameter x parameters x T
               + the measured cost per token pair and layer x query width x layers x width x T^2
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


def kernel_path(plan: MemoryPlan, native: bool) -> str:
    """'native_block', 'float32' or 'bfloat16': which calibrated path the planned model runs on."""
    req = plan.request
    if req.device == "cpu" and native and matrix_type(plan.source, req) in NATIVE_BLOCK_TYPES:
        return "native_block"
    return "float32" if req.act_bytes() == 4 else "bfloat16"


def native_row_limit(act: str) -> int:
    """Most rows kiln runs through its block/panel kernels before the dense GEMM (kiln.layers.gguf_quant)."""
    from kiln.layers.gguf_quant import default_dense_threshold, default_panel_rows

    if act == "float32":
        return max(default_panel_rows()[1], default_dense_threshold(True))
    return default_dense_threshold(True)


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
    kv_token = plan.whole.kv_per_token_bytes
    head_share = a.vocab_size * a.hidden_size / (_linear_params(plan) + a.vocab_size * a.hidden_size)

    def step(b: int, r: int) -> dict[str, float]:
        # kiln's own kernel choice: block kernels up to `limit` rows, the dense GEMM (resident copy) above
        p, nbytes = (cal["paths"]["native_block"], block_bytes) if r <= limit else (dense, dense_bytes)
        per_byte, fixed = p["s_per_byte"], p["fixed_s"]
        if act == "float32" and r >= p.get("panel_from_rows", 1 << 30):  # the panel kernel's regime
            per_byte, fixed = p["panel_s_per_byte"], p["panel_fixed_s"]
        return {"weights": nbytes * _lin(per_byte, r),
                "kv_reads": b * decode_context * kv_token / cal["read_bytes_per_s"],
                "outside forward": max(0.0, _lin(fixed, b))}

    one = step(1, 1)
    conc = concurrency or req.concurrency
    many = step(conc, rows or conc)
    pf = dense["prefill"]  # a prefill chunk has more rows than any block-kernel limit: the activation dtype's GEMM
    prefill_s = (pf["fixed_s"] + pf["s_per_token_param"] * _linear_params(plan) * prompt_tokens
                 + pf["s_per_token_pair_layer_q"] * a.num_layers * a.q_size * prompt_tokens ** 2
                 + step(1, 1)["weights"] * head_share)  # + the LM head for the last token

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
