"""The README's tables for checkpoints from other tools (issue 24): the quality of sequential GPTQ, clipped
AWQ, llm-compressor's GPTQ/AWQ and the foreign folders kiln loads (benchmarks/results/quant_quality_issue24.json,
written by benchmarks/quant_quality.py at a reduced setting), and the decode speed of foreign W4A16 folders
against kiln's own INT4 folder of the same weights (benchmarks/results/foreign_decode.json); and the K-quant
rows: kiln's `kiln convert --type q4_k_m|q5_k_m|q6_k` next to llama-quantize's files of the same F16 source
(benchmarks/results/kquant_quality.json).

Registered in kiln.bench.report.TABLES; a separate module so that file stays one screen per table family.
"""

from __future__ import annotations

from typing import Any

from kiln.bench.result_files import load_result as _load


def quality_rows(results: list[dict[str, Any]]) -> list[str]:
    """The quality table's rows (shared with kiln.bench.report.quant_quality_table's layout)."""
    rows = ["| method | mean bits | size on disk (MiB) | PPL | ΔPPL | mean KL | p99 KL | top-1 agree | mean abs Δp |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        size = f"{r['size_bytes'] / 2**20:.1f}"
        if "kl_mean" not in r:
            rows.append(f"| {r['method']} | – | {size} | {r['ppl']:.3f} ± {r['ppl_stderr']:.3f} | – | – | – | – | – |")
            continue
        bits = f"{r['mean_bits']:.2f}" if r.get("mean_bits") is not None else "–"
        rows.append(f"| {r['method']} | {bits} | {size} | {r['ppl']:.3f} ± {r['ppl_stderr']:.3f} | "
                    f"{r['delta_ppl_pct']:+.2f} % | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | "
                    f"{100 * r['top1_agreement']:.1f} % | {r['mean_abs_dp']:.4f} |")
    return rows


def foreign_quality_table() -> str:
    d = _load("quant_quality_issue24")
    if d is None:
        return "_not measured yet_"
    return (f"WikiText-2 test, {d['chunks']} windows of {d['ctx']} tokens ({d['tokens_scored']} tokens scored); "
            f"calibration: {d['calibration']} for kiln and llm-compressor alike (fewer windows than the table above, "
            "so its rows are not comparable with these).\n\n" + "\n".join(quality_rows(d["results"]))
            + f"\n\n_From `benchmarks/quant_quality.py --calib-samples 8 --skip-mixed --only …` → "
            f"`benchmarks/results/quant_quality_issue24.json`, one run, {d['date']}, {d['machine']}, "
            f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}; llm-compressor's folders from "
            "`benchmarks/llmcompressor_reference.py` on the same windows._")


def foreign_decode_table() -> str:
    d = _load("foreign_decode")
    if d is None:
        return "_not measured yet_"
    rows = ["| folder | decode tok/s (median) | per round | / kiln's folder, per round | prefill tok/s (1,024) |",
            "|---|---:|---|---|---:|"]
    for r in d["rows"]:
        per_round = ", ".join(f"{x:.1f}" for x in r["decode_tok_s"])
        ratios = ", ".join(f"{x:.2f}" for x in r["decode_ratio_vs_kiln_per_round"])
        rows.append(f"| {r['folder']} | {r['decode_tok_s_median']:.1f} | {per_round} | {ratios} | "
                    f"{r['prefill_tok_s_median']:.0f} |")
    worst = min(x for r in d["rows"] for x in r["decode_ratio_vs_kiln_per_round"])
    verdict = "met" if worst >= 0.9 else "not met"
    sched = "; real-time priority (SCHED_FIFO)" if d.get("scheduling") == "SCHED_FIFO" else ""
    return (f"{d['weights']}: single-stream decode of {d['output_len']} tokens and a {d['prefill_len']}-token prefill, "
            f"each folder in a fresh process, {d['rounds']} alternating rounds.\n\n" + "\n".join(rows)
            + f"\n\nWithin 10 % of kiln's own folder in every round: {verdict} (lowest per-round ratio {worst:.2f})."
            + f"\n\n_From `benchmarks/foreign_decode.py` → `benchmarks/results/foreign_decode.json`, one run, {d['date']}, "
            f"{d['machine']}, {d['threads']} threads{sched}._")


def kquant_quality_table() -> str:
    """kiln's K-quant files next to llama-quantize's of the same F16 source (benchmarks/kquant_quality.py)."""
    d = _load("kquant_quality")
    if d is None:
        return "_not measured yet_"
    m = d["machine"]
    intro = (f"WikiText-2 test, {d['chunks']} windows of {d['ctx']} tokens ({d['tokens_scored']} tokens scored, "
             "llama.cpp's chunking); reference: the F16 source, which is the default Q4_1 GGUF "
             "dequantized and rounded to fp16 (`kiln convert smollm2-135m --type f16`), so every row re-quantizes "
             "already-4-bit weights. Every file is scored by kiln with its weights dequantized to fp32 at load; "
             "mean bits = bits per weight of the 2-D tensors.")
    parts = [intro, "", *quality_rows(d["results"])]
    agree = d.get("kiln_vs_llama_quantize") or {}
    if agree:
        shares = ", ".join(f"{t}: {100 * a['identical_share']:.4f} % ({a['blocks'] - a['identical_blocks']} of "
                           f"{a['blocks']:,} differ)" for t, a in agree.items())
        same_types = "identical" if all(a["tensor_types_equal"] for a in agree.values()) else "NOT identical"
        parts += ["", (f"kiln's files against llama-quantize's from the same F16 file: tensor types {same_types}; "
                       f"byte-identical quantized blocks {shares}.")]
    peer = d.get("llama_perplexity") or {}
    if peer:
        def one(label: str) -> str:
            r = peer[label]
            err = f" ± {r['ppl_stderr']:.4f}" if r.get("ppl_stderr") is not None else ""
            return f"{label} **{r['ppl']:.4f}**{err} ({r['chunks']} windows)"
        parts += ["", ("llama.cpp's `llama-perplexity` (its own tokenizer and chunking, same 512-token windows): "
                       + "; ".join(one(label) for label in peer) + ".")]
    conv = d.get("conversion_seconds") or {}
    if conv:
        parts += ["", ("Conversion time (s; kiln's K-quant times start from the F16 file already loaded, kiln f16 "
                       "includes loading the default GGUF, llama-quantize includes its own load): "
                       + ", ".join(f"{k} {v}" for k, v in conv.items()) + ".")]
    load = f"load average {m['load_average_start'][0]:.1f} → {m['load_average_end'][0]:.1f}"
    parts += ["", (f"_From `{d['command'].strip()}` → `benchmarks/results/kquant_quality.json`, one run, {d['date']}, "
                   f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, at nice 19 on the shared machine ({load}; "
                   "quality figures do not depend on load, times do)._")]
    return "\n".join(parts)


__all__ = ["foreign_decode_table", "foreign_quality_table", "kquant_quality_table", "quality_rows"]
