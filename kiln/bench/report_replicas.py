"""The README's replicas table (benchmarks/replicas.py → benchmarks/results/replicas.json, issue 17)."""

from __future__ import annotations

from kiln.bench.result_files import load_result


def replicas_table() -> str:
    """64 streaming clients by how the cores are split, and prefix-affinity vs Ray's default routing."""
    d = load_result("replicas")
    if d is None:
        return "_not measured yet_"
    m, c, r = d["machine"], d["clients"], d["routing"]
    rows = ["| 64 streaming clients | output tok/s | TTFT p50 | TTFT p95 | errors |", "|---|---:|---:|---:|---:|"]
    for name, run in c["runs"].items():
        rows.append(f"| {name} | {run['output_tok_s']:.0f} | {run['ttft_p50_s']:.2f} s | {run['ttft_p95_s']:.2f} s | "
                    f"{run['errors']} |")
    rows += ["", f"| multi-turn chat, {r['replicas']} replicas x {r['threads_per_replica']} thread | prefix-cache hit "
             f"rate | TTFT p50, turns 2+ | TTFT p95, turns 2+ | TTFT p95, all turns |", "|---|---:|---:|---:|---:|"]
    for name, run in r["runs"].items():
        rows.append(f"| {name} | {run['prefix_hit_rate'] * 100:.1f} % | {run['ttft_later_turns_p50_s']:.2f} s | "
                    f"{run['ttft_later_turns_p95_s']:.2f} s | {run['ttft_all_turns_p95_s']:.2f} s |")
    return ("\n".join(rows)
            + f"\n\n2 replicas x 1 thread / 1 replica x 2 threads = {c['ratio_2x1_over_1x2']:.2f} (output tok/s)"
            + (f"; 1 replica on Ray / `kiln serve` alone = {c['ratio_ray_1x2_over_plain']:.2f}."
               if "ratio_ray_1x2_over_plain" in c else ".")
            + f"\n\n_From `benchmarks/replicas.py` → `benchmarks/results/replicas.json`, one run, {d['date']}; "
            f"{m['cpu']}, {m['cores']} cores, load average {m['load_average_start']:.1f} at the start and "
            f"{m.get('load_average_end', float('nan')):.1f} at the end, read bandwidth {m['read_bandwidth_gb_s_start']:.1f} GB/s "
            f"at the start; scheduling: {m.get('scheduling', 'normal')}; "
            f"GSM8K chat questions, {c['requests']} requests at {c['clients']} clients, "
            f"{c['new_tokens']} new tokens; chats: {r['conversations']} conversations x {r['turns']} turns, "
            f"{r['new_tokens_per_turn']} new tokens a turn, greedy; each configuration a fresh server._")
