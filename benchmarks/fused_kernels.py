"""Each fused kernel against the unfused torch ops it replaces, on the default model's shapes.

SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, FFN 1536, fp32 (kiln's default on this CPU)
and bf16 activations, 2 threads.
For every kernel: the median time of the fused op and of its plain-torch twin (the ops the model
would otherwise run), their ratio, and the largest difference between the two outputs (the
correctness check; the tests assert the same against tolerances). The paged prefill kernel is
compared with the gather + SDPA path it replaces. The last row is the whole fused
decode step (kiln.kernels.decode_step) against the op-by-op forward of the real model.
Writes benchmarks/results/fused_kernels.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

OUT = Path(__file__).parent / "results" / "fused_kernels.json"
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 576, 9, 3, 64, 1536
DTYPES = (torch.float32, torch.bfloat16)


def median_us(fn: Callable[[], Any], iters: int = 400) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def row(name: str, rows: int, dtype: torch.dtype, fused: Callable[[], torch.Tensor],
        plain: Callable[[], torch.Tensor]) -> dict[str, Any]:
    err = (fused().float() - plain().float()).abs().max().item()
    f_us, p_us = median_us(fused), median_us(plain)
    dt = str(dtype).removeprefix("torch.")
    print(f"{name:42s} {dt:8s} M={rows:<3d} fused {f_us:9.1f} us  unfused {p_us:9.1f} us  {p_us / f_us:5.2f}x  "
          f"max|diff| {err:.2e}")
    return {"kernel": name, "dtype": dt, "rows": rows, "fused_us": f_us, "unfused_us": p_us, "speedup": p_us / f_us,
            "max_abs_diff": err}


def elementwise_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    from kiln.kernels import fused
    from kiln.layers.rotary import RotaryEmbedding

    out = []
    rope = RotaryEmbedding(HEAD_DIM, 8192, 100000.0)
    w = (1 + 0.1 * torch.randn(HIDDEN)).to(dtype)
    for m in (1, 8):
        x, res = torch.randn(m, HIDDEN, dtype=dtype), torch.randn(m, HIDDEN, dtype=dtype)
        out.append(row("residual add + RMSNorm", m, dtype,
                       lambda: torch.ops.kiln.add_rms_norm(x, res.clone(), w, 1e-5, True),
                       lambda: fused.add_rms_norm_reference(x, res.clone(), w, 1e-5)[0]))
        gate_up = torch.randn(m, 2 * FFN, dtype=dtype) * 3
        out.append(row("SiLU(gate) * up", m, dtype, lambda: torch.ops.kiln.silu_and_mul(gate_up),
                       lambda: fused.silu_and_mul_reference(gate_up)))
        qkv = torch.randn(m, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
        pos = torch.arange(100, 100 + m)

        def rope_fused(q=qkv) -> torch.Tensor:
            t = q.clone()
            torch.ops.kiln.rope_qkv_(t, pos, rope.cos, rope.sin, HEADS, KV_HEADS, HEAD_DIM)
            return t

        def rope_plain(q=qkv) -> torch.Tensor:
            t = q.clone()
            fused.rope_qkv_reference(t, pos, rope.cos, rope.sin, HEADS, KV_HEADS, HEAD_DIM)
            return t

        out.append(row("RoPE on fused QKV (in place)", m, dtype, rope_fused, rope_plain))
    return out


def attention_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    from kiln.kernels.kv_quant import allocate_kv_caches
    from kiln.kernels.paged_attention import _decode_fallback, _native_decode
    from kiln.kernels.attention_metadata import build_attention_metadata

    out = []
    block_size, context = 16, 512
    for batch in (1, 8, 64):
        per_seq = context // block_size
        for kv_dtype in ("auto", "int8"):
            (k_cache, v_cache), = allocate_kv_caches(1, (batch * per_seq, block_size, KV_HEADS, HEAD_DIM), kv_dtype,
                                                     dtype, "cpu")
            blocks = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
            meta = build_attention_metadata([1] * batch, [context - 3 * i for i in range(batch)], blocks, block_size)
            kv = torch.randn(batch * per_seq * block_size, KV_HEADS, HEAD_DIM, dtype=dtype)
            from kiln.kernels.paged_attention import write_kv

            write_kv(kv, kv * 0.5, k_cache, v_cache, torch.arange(kv.shape[0]))
            q = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype)
            stored = "int8" if kv_dtype == "int8" else str(k_cache.dtype).removeprefix("torch.")
            label = f"paged decode attention ({stored} KV)"
            out.append(row(f"{label}, ctx {context}", batch, dtype,
                           lambda: _native_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, 0.125),
                           lambda: _decode_fallback(q, k_cache, v_cache, meta, 0.125)))
    return out


def prefill_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    """kiln's paged prefill kernel vs the gather + SDPA path it replaces, one sequence: a fresh
    1,024-token prompt, a 512-token chunk after a 512-token prefix, a serving-sized prompt."""
    from kiln.kernels.kv_quant import allocate_kv_caches
    from kiln.kernels.paged_attention import _prefill_kernel, _sdpa_prefill, write_kv

    out = []
    block_size = 16
    for q_len, seq_len in ((1024, 1024), (512, 1024), (75, 91)):
        n_blocks = (seq_len + block_size - 1) // block_size
        (k_cache, v_cache), = allocate_kv_caches(1, (n_blocks, block_size, KV_HEADS, HEAD_DIM), "auto", dtype, "cpu")
        kv = torch.randn(n_blocks * block_size, KV_HEADS, HEAD_DIM, dtype=dtype)
        write_kv(kv, kv * 0.5, k_cache, v_cache, torch.arange(kv.shape[0]))
        table = torch.randperm(n_blocks).to(torch.int32)  # scattered blocks, as a real cache has them
        q = torch.randn(q_len, HEADS, HEAD_DIM, dtype=dtype)
        stored = str(k_cache.dtype).removeprefix("torch.")
        name = f"paged prefill attention ({stored} KV), {q_len} queries, ctx {seq_len}"
        out.append(row(name, q_len, dtype, lambda: _prefill_kernel(q, k_cache, v_cache, table, seq_len, 0.125),
                       lambda: _sdpa_prefill(q, k_cache, v_cache, table, seq_len, 0.125)))
    return out


def decode_step_row() -> dict[str, Any]:
    """One decode step of the real model at context 128: DecodePlan.run vs the op-by-op forward."""
    from kiln import LLM
    from kiln.kernels.decode_step import run_decode_plan
    from kiln.kernels.kv_quant import allocate_kv_caches
    from kiln.kernels.attention_metadata import build_attention_metadata

    model = LLM("smollm2-135m").engine.loaded.model
    cfg = model.config
    caches = allocate_kv_caches(cfg.num_hidden_layers, (16, 16, cfg.num_key_value_heads, cfg.head_dim), "auto",
                                model.dtype, "cpu")
    with torch.inference_mode():
        meta = build_attention_metadata([128], [128], [list(range(16))], 16)
        model.fused_decode_step = False
        model(torch.randint(0, 1000, (128,)), torch.arange(128), meta, caches)
        meta = build_attention_metadata([1], [129], [list(range(16))], 16)
        ids, pos = torch.tensor([42]), torch.tensor([128])
        plan = model.decode_plan()
        result = row("whole decode step (30 layers + final norm)", 1, model.dtype,
                     lambda: run_decode_plan(plan, model.embed_tokens(ids), pos, meta, caches),
                     lambda: model(ids, pos, meta, caches))
    result["decode_path"] = model.decode_plan_status
    return result


def main() -> None:
    torch.set_num_threads(2)
    from kiln.kernels.native import load_native, simd_path

    if not load_native():
        raise SystemExit("the native kernel library did not build; nothing to compare")
    with torch.inference_mode():
        rows = [r for dtype in DTYPES for r in elementwise_rows(dtype) + attention_rows(dtype) + prefill_rows(dtype)]
    rows.append(decode_step_row())
    report = {"benchmark": "fused_kernels", "threads": 2, "simd_path": simd_path(),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
