"""The README's dense-decode table (benchmarks/dense_decode.py → benchmarks/results/dense_decode.json)."""

from __future__ import annotations

import statistics

from kiln.bench.result_files import load_result

_LABELS = {"kiln_kernel": "kiln, dense decode kernel (default)", "kiln_torch": "kiln, torch GEMM (KILN_QUANT_KERNELS=0)",
           "transformers": "transformers `generate` (sdpa)"}


def dense_decode_table() -> str:
    """Single-stream decode of the dequantized default model, fp32 and bf16: kiln's kernel, torch's GEMM, transformers."""
    d = load_result("dense_decode")
    if d is None:
        return "_not measured yet_"
    rows = ["| weights | system | decode tok/s (median, min–max) | kiln's kernel is (per round) |", "|---|---|---:|---:|"]
    for dtype in ("float32", "bfloat16"):
        for key, label in _LABELS.items():
            runs = [r["tok_s"] for r in d["runs"][f"{key}_{dtype}"]]
            ratio = ""
            if key != "kiln_kernel":
                pairs = d["per_round"][f"kiln_kernel_{dtype}_vs_{key}_{dtype}"]
                ratio = f"{statistics.median(pairs):.2f}× ({min(pairs):.2f}–{max(pairs):.2f})"
            rows.append(f"| {dtype} | {label} | {statistics.median(runs):.1f} ({min(runs):.1f}–{max(runs):.1f}) | {ratio} |")
    m = d["machine"]
    limits = ", ".join(f"{k} M ≤ {v}" for k, v in d.get("dense_kernel_rows", {}).items())
    return ("\n".join(rows)
            + f"\n\n_From `benchmarks/dense_decode.py` → `benchmarks/results/dense_decode.json`, {d['date']}; {m['cpu']}, "
              f"{m['threads']} threads, load average {m['load_average_start']:.1f} at the start; {d['model']}; "
              f"{len(d['runs']['kiln_kernel_float32'])} alternating rounds of fresh processes, 128 tokens after a chat "
              f"prompt; the kernel's row limits in that run: {limits}._")


__all__ = ["dense_decode_table"]
