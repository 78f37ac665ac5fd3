"""The README's table of kiln against llama.cpp's C++ tools, single stream (issue 21), rendered from
benchmarks/results/single_stream_peers.json (benchmarks/single_stream_peers.py).

Registered in kiln.bench.report.TABLES as "single_stream_peers".
"""

from __future__ import annotations

from typing import Any

from kiln.bench.result_files import load_result as _load

LABELS = {"serve_vs_llama_server": "`kiln serve` / `llama-server -np 1`, streamed decode",
          "decode_vs_llama_bench_tg128": "kiln decode / `llama-bench` tg128",
          "prefill_vs_llama_bench_pp1024": "kiln prefill / `llama-bench` pp1024"}


def _range(values: list[float]) -> str:
    # not `_spread` (defined below for the ratio rows): a second def of that name shadowed this one
    return f"{min(values):.1f}–{max(values):.1f}"


def single_stream_peers_table(name: str = "single_stream_peers") -> str:
    d = _load(name)
    if d is None:
        return "_not measured yet_"
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
        rows.append(f"| {label} | {d['medians'][key]:.1f} | {_range(values)} |")
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
            + f"\n\n_From `benchmarks/single_stream_peers.py` → `benchmarks/results/{name}.json`, one run of "
            f"{len(rounds)} alternating rounds (each system a fresh process every round), {d['date']}; {m['cpu']} "
            f"({', '.join(m['flags'])}), {m['cores']} cores, {m['threads']} threads per system; read bandwidth "
            f"{m['read_bandwidth_gb_s_start']:.1f} GB/s at the start, {m['read_bandwidth_gb_s_end']:.1f} at the end; "
            f"scheduling: {sched}; kiln's kernel choice: {m.get('kiln_kernel_choice', 'not recorded')}; "
            f"llama.cpp built with {build}._")






def kernel_tune_table(name: str = "kernel_tune") -> str:
    """`kiln tune` on the machine of the run: each path's time at each M, the fitted crossovers, and the
    engine's decode with them against the built-in ones."""
    d = _load(name)
    if d is None:
        return "_not measured yet_"
    fp, rows = d["fingerprint"], d["rows"]
    lines = []
    for dtype, by_m in d["seconds_per_step"].items():
        paths = [p for p in ("block", "panel", "resident", "dequantize") if p in by_m[str(rows[0])]]
        lines += [f"**{dtype} activations**, ms for one decode step's {d['linears']} Q4 linears:", "",
                  "| M | " + " | ".join(paths) + " |", "|---:|" + "---:|" * len(paths)]
        for m in rows:
            t = by_m[str(m)]
            best = min(t[p] for p in paths)
            cells = [f"**{1e3 * t[p]:.1f}**" if t[p] == best else f"{1e3 * t[p]:.1f}" for p in paths]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| activations | fallback above kiln's kernels | tuned here | built-in |", "|---|---|---|---|"]
    b = d["built_in"]
    for dtype, by_copy in d["crossovers"].items():
        for copy, c in by_copy.items():
            tuned = f"block M≤{c['block_max']}" + (f", panel {c['panel'][0]}–{c['panel'][1]}" if c["panel"][1] else "")
            limit = b["block_max_vs_resident"] if copy == "resident" else b["block_max_vs_dequantize"]
            built = (f"block M≤{min(limit, b['panel_fp32'][0] - 1)}, panel {b['panel_fp32'][0]}–{b['panel_fp32'][1]}"
                     if dtype == "float32" and b["panel_fp32"][1] else f"block M≤{limit}")
            fallback = "resident dense copy" if copy == "resident" else "dequantize per call"
            lines.append(f"| {dtype} | {fallback} | {tuned} | {built} |")
    if d.get("fp32_dense_copy") == "bfloat16":
        q = d.get("bf16_copy_quality") or {}
        lines += ["", f"fp32 models keep their dense copy (prefill, the largest batches) in **bf16** here: its GEMM, casts "
                  f"included, beat the fp32 one by {d['seconds_per_step']['float32'][str(rows[-1])]['resident'] / d['seconds_per_step']['float32'][str(rows[-1])]['resident_bf16']:.1f}x at M={rows[-1]}"
                  + (f"; cost against the fp32 copy, teacher-forced over {q['tokens']} WikiText-2 tokens: mean KL "
                     f"{q['kl_mean']:.5f}, p99 {q['kl_p99']:.4f}, top-1 agreement {100 * q['top1_agreement']:.1f} %" if q else "")
                  + ". The blocks, which decode small batches, stay exact."]
    e = d.get("engine_decode_tok_s")
    if e:
        lines += ["", "Engine (default model, fp32 activations, dense copy resident), decode and prefill tok/s, median of 3 "
                  "alternating fresh processes:", "", "| sequences | tuned | built-in | tuned / built-in |",
                  "|---:|---:|---:|---:|"]
        for batch, tok_s in e["tuned"].items():
            lines.append(f"| {batch} | {tok_s:.1f} | {e['built-in'][batch]:.1f} | {tok_s / e['built-in'][batch]:.2f} |")
        p = d.get("engine_prefill_1024_tok_s")
        if p:
            lines.append(f"| prefill, 1,024-token prompt | {p['tuned']:.0f} | {p['built-in']:.0f} | "
                         f"{p['tuned'] / p['built-in']:.2f} |")
    lines.append(f"\n_From `benchmarks/kernel_tune.py` → `benchmarks/results/{name}.json` (`kiln tune`), one run, "
                 f"{d['date']}; {fp['cpu']} ({', '.join(fp['flags'])}), {fp['threads']} threads, {fp['simd']} build, "
                 f"torch {fp['torch']}; 10th percentile of {d.get('tune_rounds', 5)} alternating rounds; load average {d['load_average']:.1f} "
                 "(other work niced, this run at nice -20)._")
    return "\n".join(lines)




def _bandwidth(m: dict) -> str:
    """'; read bandwidth X GB/s at the start, Y at the end' where the run recorded it."""
    if "read_bandwidth_gb_s_start" not in m:
        return ""
    end = f", {m['read_bandwidth_gb_s_end']:.1f} at the end" if "read_bandwidth_gb_s_end" in m else ""
    return f"; read bandwidth {m['read_bandwidth_gb_s_start']:.1f} GB/s at the start{end}"


def concurrent_peers_table(name: str = "concurrent_peers") -> str:
    """`kiln serve` against the best `llama-server -np` at 32 and 64 streaming clients (issue 21)."""
    d = _load(name)
    if d is None:
        return "_not measured yet_"
    m = d["machine"]
    rows = ["| clients | system | output tok/s | TTFT p50 | TTFT p95 | errors |", "|---:|---|---:|---:|---:|---:|"]
    verdicts = []
    for c, level in d["levels"].items():
        for system, r in sorted(level["runs"].items(), key=lambda kv: -kv[1]["output_tok_s"]):
            mark = " (best peer)" if system == level["best_peer"] else ""
            rows.append(f"| {c} | {system}{mark} | {r['output_tok_s']:.0f} | {r['ttft_p50_s']:.2f} s | "
                        f"{r['ttft_p95_s']:.2f} s | {r['errors']} |")
        per = ", ".join(f"{x:.2f}" for x in level["ratio_per_kiln_run"])
        ttft = level["runs"]["kiln serve"]["ttft_p95_s"]
        line = (f"- {c} clients: kiln serve / best llama-server = {level['ratio_vs_best_peer']:.2f} (kiln's two runs: {per}); "
                f"target 3x: {level['verdict']}")
        if level.get("ttft_p95_target_s"):
            line += f"; kiln's TTFT p95 {ttft:.2f} s against ≤ {level['ttft_p95_target_s']:.0f} s: " \
                    f"{'met' if ttft <= level['ttft_p95_target_s'] else 'not met'}"
        verdicts.append(line)
    return ("\n".join(rows) + "\n\n" + "\n".join(verdicts)
            + f"\n\n_From `benchmarks/concurrent_peers.py` → `benchmarks/results/{name}.json`, one run, {d['date']}; "
            f"{m['cpu']}{' (' + ', '.join(m['flags']) + ')' if m.get('flags') else ''}, {m['threads']} threads per server"
            f"{_bandwidth(m)}{'; kiln' + chr(39) + 's kernel choice: ' + m['kiln_kernel_choice'] if m.get('kiln_kernel_choice') else ''}"
            f"; GSM8K chat questions, {d['decode_tokens']} new tokens, "
            f"2 x clients requests closed loop; kiln serve before and after the peers (mean of the two); "
            f"scheduling: {m.get('scheduling', 'normal')}._")




def gemma3_decode_table(name: str = "gemma3_decode") -> str:
    """Gemma 3 270M Q4_K_M (or, `name`, another GGUF's) single-stream decode: kiln on its block kernels vs kiln
    dequantized vs `llama-bench` tg128 (benchmarks/gemma3_decode.py, issue 19)."""
    d = _load(name)
    if d is None:
        return "_not measured yet_"
    t, r, m = d["median_tok_s"], d["ratios"], d["machine"]
    # runs before the K-quant kernels (issue 19) dequantized the Q6_K layers; the run's linear paths say which
    paths = " ".join(p for run in d["runs"].get("kiln_native", []) for p in run.get("linear_paths", {}))
    q6k = "Q6_K super-block kernel" if "Q6_K super-block kernel" in paths else "Q6_K dequantized"
    q5 = "Q5_0 in 5 bits" if "int5" in paths else "Q5_0→Q8_0"
    labels = {"kiln_native": f"kiln, block kernels (Q8_0; {q5}, Q4_K→Q4_1 repacked; {q6k})",
              "kiln_dequantized_bf16": "kiln, every tensor dequantized, bf16", "kiln_dequantized_fp32":
              "kiln, every tensor dequantized, fp32", "llama_bench_tg128": "`llama-bench` tg128 (C++)"}
    if name != "gemma3_decode":
        labels["kiln_native"] = "kiln, native kernels (" + ", ".join(sorted(d.get("tensor_types", {}))) + " as loaded)"
    rows = ["| system | decode tok/s (median) |", "|---|---:|"] + [f"| {labels.get(k, k)} | {v:.1f} |" for k, v in t.items()]
    path = next((run.get("decode_path") for run in d["runs"].get("kiln_native", []) if run.get("decode_path")), None)
    return ("\n".join(rows) + f"\n\nkiln blocks / dequantized bf16 = {r['native_vs_dequantized_bf16']:.2f}"
            f"{_spread(d.get('per_round_native_vs_dequantized_bf16'))} (target 2: "
            f"{_verdict(r['native_vs_dequantized_bf16'], d.get('per_round_native_vs_dequantized_bf16'), 2)}); "
            f"kiln / `llama-bench` = {r['native_vs_llama_bench']:.2f}{_spread(d.get('per_round_native_vs_llama_bench'))} "
            f"(target 1.0: {_verdict(r['native_vs_llama_bench'], d.get('per_round_native_vs_llama_bench'), 1)})."
            + (f" kiln's decode step: {path}." if path else "")
            + f"\n\n_From `benchmarks/gemma3_decode.py` → `benchmarks/results/{name}.json`, {d['model']}, {d['date']}; "
            f"{m['cpu']}, {m['threads']} threads"
            + (f", load average {m['load_average_start'][0]:.1f} at the start" if "load_average_start" in m else "")
            + ", each kiln configuration a fresh process, alternating rounds._")


def _spread(pairs: list[float] | None) -> str:
    return f" (per round {min(pairs):.2f}–{max(pairs):.2f})" if pairs else ""


def _verdict(median: float, pairs: list[float] | None, target: float) -> str:
    """'met' only when every round clears the target; a spread that crosses it is 'not established'."""
    if pairs and min(pairs) < target <= max(pairs):
        return "not established"
    return "met" if median >= target else "not met"


def gemma3_perplexity_table() -> str:
    """`kiln eval ppl gemma3-270m` vs llama.cpp's `llama-perplexity` (benchmarks/gemma3_perplexity.py, issue 19)."""
    d = _load("gemma3_perplexity")
    if d is None:
        return "_not measured yet_"
    rows = ["| engine | PPL | ± | vs llama-perplexity |", "|---|---:|---:|---:|"]
    ref = d["llama_perplexity"]["ppl"]
    for key, label in (("kiln_fp32", "kiln, GGUF dequantized to fp32 (`kiln eval ppl`)"),
                       ("kiln_native", "kiln, native block kernels (`--quantized-weights auto`)"),
                       ("llama_perplexity", "`llama-perplexity` (C++)")):
        r = d[key]
        rows.append(f"| {label} | {r['ppl']:.4f} | {r['ppl_stderr']:.4f} | {r['ppl'] / ref:.4f} |")
    worst = max(abs(d[k]["ppl"] / ref - 1) for k in ("kiln_fp32", "kiln_native"))
    return ("\n".join(rows) + f"\n\nWithin 1 % of llama-perplexity: {'yes' if worst <= 0.01 else 'no'} "
            f"(largest difference {100 * worst:.2f} %)."
            f"\n\n_From `benchmarks/gemma3_perplexity.py` → `benchmarks/results/gemma3_perplexity.json`, {d['model']}, "
            f"WikiText-2 test, ctx {d['ctx']}, {d['chunks']} chunks, {d['date']}; {d['cpu']}, {d['threads']} threads._")


def kquant_decode_smollm2_table() -> str:
    return gemma3_decode_table("kquant_decode_smollm2")


__all__ = ["concurrent_peers_table", "gemma3_decode_table", "gemma3_perplexity_table", "kernel_tune_table", "kquant_decode_smollm2_table",
           "single_stream_peers_table"]
