"""The README's tables for checkpoints from other tools (issue 24): the quality of sequential GPTQ, clipped
AWQ, llm-compressor's GPTQ/AWQ and the foreign folders kiln loads (benchmarks/results/quant_quality_issue24.json,
written by benchmarks/quant_quality.py at a reduced setting), and the decode speed of foreign W4A16 folders
against kiln's own INT4 folder of the same weights (benchmarks/results/foreign_decode.json).

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


__all__ = ["foreign_decode_table", "foreign_quality_table", "quality_rows"]
