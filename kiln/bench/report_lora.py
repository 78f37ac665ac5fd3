"""README table of benchmarks/lora_serving.py: serving adapters vs merging them (issue 20)."""

from __future__ import annotations

from kiln.bench.result_files import load_result

_LABELS = {
    "base": "base model alone (Q4_1 blocks)",
    "lora_1": "LoRA on, 1 adapter (Q4_1 base)",
    "lora_4": "LoRA on, 4 adapters (Q4_1 base)",
    "lora_16": "LoRA on, 16 adapters (Q4_1 base)",
    "base_dense": "base dequantized (dense)",
    "merged": "adapter merged into the weights (float16 folder, dense)",
}


def lora_serving_table() -> str:
    d = load_result("lora_serving")
    if d is None:
        return "_not measured yet_"
    m = d["machine"]
    rows = ["| configuration | tok/s | vs base | peak RSS | adapter slots |", "|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        slots = f"{r['lora_slot_mib']:.0f} MiB" if r["lora_slot_mib"] else "—"
        rows.append(f"| {_LABELS.get(r['config'], r['config'])} | {r['tokens_per_s']:.0f} | "
                    f"{d['vs_base'][r['config']]:.2f} | {r['peak_rss_mib']:.0f} MiB | {slots} |")
    load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    return ("\n".join(rows)
            + f"\n\n_From `benchmarks/lora_serving.py` → `benchmarks/results/lora_serving.json`, one run, {d['date']}; "
              f"{m['cpu']}, {m['threads']} threads, load average {load} at the start; {d['concurrency']} concurrent "
              f"requests, {d['new_tokens']} greedy tokens each, rank-{d['adapter_rank']} adapters on all seven "
              "projections, each configuration a fresh process._")


__all__ = ["lora_serving_table"]
