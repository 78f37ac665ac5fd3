"""The README's table of kiln against llama.cpp's C++ tools, single stream (issue 21), rendered from
benchmarks/results/single_stream_peers.json (benchmarks/single_stream_peers.py).

Registered in kiln.bench.report.TABLES as "single_stream_peers".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "single_stream_peers.json"
LABELS = {"serve_vs_llama_server": "`kiln serve` / `llama-server -np 1`, streamed decode",
          "decode_vs_llama_bench_tg128": "kiln decode / `llama-bench` tg128",
          "prefill_vs_llama_bench_pp1024": "kiln prefill / `llama-bench` pp1024"}


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}"


def single_stream_peers_table() -> str:
    if not RESULT.exists():
        return "_not measured yet_"
    d: dict[str, Any] = json.loads(RESULT.read_text())
    m, rounds = d["machine"], d["rounds"]
    rows = ["| system | median tok/s | range over rounds |", "|---|---:|---|"]
    kiln_system = d["kiln_system"].removeprefix("kiln (").removesuffix(")")
    names = [("kiln offline decode", f"kiln `LLM` decode, {d['decode_tokens']} tokens ({kiln_system})"),
             ("kiln serve", "`kiln serve`, one streamed chat completion"),
             ("llama-server -np 1", "`llama-server -np 1`, the same request and client"),
             ("llama-bench tg128", "`llama-bench` tg128 (best of flash attention off/on)"),
             ("kiln offline prefill", f"kiln prefill, {d['prefill_tokens']}-token prompt"),
             ("llama-bench pp1024", "`llama-bench` pp1024 (best of flash attention off/on)"),
             ("llama-bench pp512", "`llama-bench` pp512 (best of flash attention off/on)")]
    for key, label in names:
        values = [r[key] for r in rounds]
        rows.append(f"| {label} | {d['medians'][key]:.1f} | {_spread(values)} |")
    ratio_rows = ["| ratio | per round | median | target | verdict |", "|---|---|---:|---:|---|"]
    for key, label in LABELS.items():
        r = d["ratios"][key]
        per = ", ".join(f"{x:.2f}" for x in r["per_round"])
        ratio_rows.append(f"| {label} | {per} | {r['median']:.2f} | ≥ {r['target']:.1f} | {r['verdict']} |")
    peers = d["peers"]["llama-bench"]
    on = [line.split(":")[0] + "=" + line.split("=")[-1] for line in peers.get("cmake_cache", [])
          if line.endswith("=ON") or line.startswith("CMAKE_BUILD_TYPE")]
    build = peers.get("why") or (", ".join(on) + f" ({peers['note']})" if on else peers.get("note", ""))
    sched = m.get("scheduling", "normal")
    return ("\n".join(rows) + "\n\n" + "\n".join(ratio_rows)
            + f"\n\nkiln's decode is {100 * d['kiln_decode_fraction_of_limit']:.0f} % of the bandwidth limit "
            f"({d['file_bytes'] / 2**20:.1f} MiB per token at the measured read bandwidth: "
            f"{d['bandwidth_limit_tok_s']:.0f} tok/s)."
            + f"\n\n_From `benchmarks/single_stream_peers.py` → `benchmarks/results/single_stream_peers.json`, one run of "
            f"{len(rounds)} alternating rounds (each system a fresh process every round), {d['date']}; {m['cpu']} "
            f"({', '.join(m['flags'])}), {m['cores']} cores, {m['threads']} threads per system; read bandwidth "
            f"{m['read_bandwidth_gb_s_start']:.1f} GB/s at the start, {m['read_bandwidth_gb_s_end']:.1f} at the end; "
            f"scheduling: {sched}; llama.cpp built with {build}._")


__all__ = ["single_stream_peers_table"]
