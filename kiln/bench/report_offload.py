"""README table of benchmarks/weight_offload.py: the default model under `--max-weight-memory` (issue 19)."""

from __future__ import annotations

from kiln.bench.result_files import load_result

_LABELS = {
    "resident_auto": "resident, kiln's default (blocks + dense copies, fused decode step)",
    "resident_lean": "resident, blocks only (`--quantized-weights native`), fused decode step",
    "resident_lean_plain": "resident, blocks only, per-layer path (what streaming runs)",
    "offload_warm": "`--max-weight-memory` a third of the file, page cache warm",
    "offload_cold": "the same, page cache cold (each layer evicted after use: every step reads the disk)",
    "offload_cold_read_ahead": "the same, cold, with `--offload-read-ahead`",
}


def weight_offload_table() -> str:
    d = load_result("weight_offload")
    if d is None:
        return "_not measured yet_"
    m, s = d["machine"], d["summary"]
    mib = 2 ** 20
    rows = ["| configuration | decode tok/s (median, min–max) | weights in RAM | mapped from disk | RSS growth | "
            "greedy = resident |", "|---|---:|---:|---:|---:|---|"]
    for name, r in s.items():
        rows.append(f"| {_LABELS.get(name, name)} | {r['median_tok_s']:.1f} ({r['min_tok_s']:.1f}–{r['max_tok_s']:.1f}) | "
                    f"{r['weights_resident_bytes'] / mib:.1f} MiB | {r['weights_mapped_bytes'] / mib:.1f} MiB | "
                    f"{r.get('median_rss_growth_bytes', 0) / mib:.0f} MiB | "
                    f"{'yes' if r['same_tokens_as_resident_lean'] else 'NO'} |")
    load = ", ".join(f"{x:.1f}" for x in m["load_average_start"])
    rounds = len(next(iter(d["runs"].values())))
    return ("\n".join(rows)
            + f"\n\n_From `benchmarks/weight_offload.py` → `benchmarks/results/weight_offload.json`, {d['date']}; "
              f"{m['cpu']}, {m['threads']} threads, load average {load} at the start; {d['model']} "
              f"({d['file_bytes'] / mib:.1f} MiB file), budget {d['budget_bytes'] / mib:.1f} MiB; {d['tokens']} greedy "
              f"tokens after a chat prompt, {rounds} alternating rounds of fresh processes. \"greedy = resident\": the "
              "tokens equal the resident blocks-only run's in every round. RSS growth: the process's resident set "
              "after decode minus before the model loaded (weights, the 64 MiB KV cache, activations, tokenizer)._")


_LOAD_LABELS = {
    "resident_auto": "no budget, kiln's default (blocks + dense copies)",
    "resident_lean": "no budget, blocks only (`--quantized-weights native`)",
    "budget_eager": "budget a third of the file, loaded fully then layers moved (before this change)",
    "budget_streamed": "budget a third of the file, streamed load (meta device, layer by layer into the spill file)",
    "vocabulary_only": "header and tokenizer only, no weights (the vocabulary's share of any load)",
    "folder_budget_eager": "safetensors folder (fp16, loaded as bf16), budget a third of its files, loaded fully "
                           "then layers moved",
    "folder_budget_streamed": "safetensors folder, same budget, streamed load (layer by layer into the spill file)",
}


def weight_offload_load_table() -> str:
    """The load-time peaks in the "load_peak" section of benchmarks/results/weight_offload.json."""
    d = load_result("weight_offload")
    if d is None or "load_peak" not in d:
        return "_not measured yet_"
    lp, mib = d["load_peak"], 2 ** 20
    rows = ["| load | peak during load (median, min–max) | resident after load | weights in RAM | mapped from disk |",
            "|---|---:|---:|---:|---:|"]
    for name, r in lp["summary"].items():
        weights = (f"{r['weights_resident_bytes'] / mib:.1f} MiB | {r['weights_mapped_bytes'] / mib:.1f} MiB"
                   if name != "vocabulary_only" else "— | —")
        rows.append(f"| {_LOAD_LABELS.get(name, name)} | {r['median_load_peak_bytes'] / mib:.1f} MiB "
                    f"({r['min_load_peak_bytes'] / mib:.1f}–{r['max_load_peak_bytes'] / mib:.1f}) | "
                    + (f"{r['median_rss_after_load_bytes'] / mib:.1f} MiB | {weights} |"
                       if name != "vocabulary_only" else "— | — | — |"))
    m = lp["machine"]
    load = ", ".join(f"{x:.1f}" for x in lp["load_average_start"])
    return ("\n".join(rows)
            + f"\n\n_From `benchmarks/weight_offload.py --load-peak-only` → `benchmarks/results/weight_offload.json` "
              f"(\"load_peak\"), {lp['date']}; {m['cpu']}, {m['threads']} threads, load average {load} at the start; "
              f"{d['model']}, budget {d['budget_bytes'] / mib:.1f} MiB"
              + (f" (the folder rows: {lp['folder_bytes'] / mib:.1f} MiB of safetensors, budget "
                 f"{lp['folder_budget_bytes'] / mib:.1f} MiB)" if "folder_bytes" in lp else "")
              + f"; {lp['rounds']} alternating rounds of fresh "
              "processes (`kiln.loader.load_peak`: one `load_model`, VmHWM minus the resident set after imports, the "
              "peak reset in between). Peak and resident after load count anonymous memory and the model file's "
              "pages mapped into the process. Load times are in the result file but not shown (they depend on the page "
              "cache more than on the load)._")


__all__ = ["weight_offload_table", "weight_offload_load_table"]
