"""The benchmark report: every README table, rendered from benchmarks/results/*.json.

One renderer for both places the figures appear: `benchmarks/report.py` writes these tables into
README.md between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers (so the README never
carries a number that is not in a checked-in result file), and kiln.bench.report_html turns the same
markdown into the `/report` page of `kiln serve` and `kiln bench report -o FILE.html`.

Each `*_table()` returns markdown (or "_not measured yet_" when its result file is absent).
"""

from __future__ import annotations

import re
from typing import Any

from kiln.bench.result_files import RESULTS, ROOT  # noqa: F401 (ROOT: for benchmarks/report.py)
from kiln.bench.result_files import load_result as _load


def results_present() -> bool:
    """Whether any result file is there to render (False in a plain install of the package)."""
    return RESULTS.is_dir() and any(RESULTS.glob("*.json"))


def _footer(d: dict[str, Any], script: str) -> str:
    return (f"\n\n_From `benchmarks/{script}` → `benchmarks/results/{script.replace('.py', '.json')}`, "
            f"one run, {d['date']}, {d['machine']}, {d['threads']} threads per system._")


def throughput_table() -> str:
    d = _load("throughput")
    if d is None:
        return "_not measured yet_"
    base = d["results"][0]["output_tok_s"]
    rows = ["| system | output tok/s | kiln is | peak RSS (MiB) |", "|---|---:|---:|---:|"]
    for r in d["results"]:
        rows.append(f"| {r['system']} | {r['output_tok_s']:.1f} | {base / r['output_tok_s']:.2f}× | "
                    f"{r['peak_rss_mib']:.0f} |")
    head = f"{d['num_prompts']} GSM8K chat prompts × {d['output_len']} new tokens.\n\n"
    return head + "\n".join(rows) + _footer(d, "throughput.py")


def latency_table() -> str:
    d = _load("latency")
    if d is None:
        return "_not measured yet_"
    base = d["results"][0]
    rows = ["| system | decode tok/s (1 stream) | kiln is | prefill tok/s (1024 tokens) | kiln is |",
            "|---|---:|---:|---:|---:|"]
    for r in d["results"]:
        rows.append(f"| {r['system']} | {r['decode_tok_s']:.1f} | {base['decode_tok_s'] / r['decode_tok_s']:.2f}× | "
                    f"{r['prefill_tok_s']:.0f} | {base['prefill_tok_s'] / r['prefill_tok_s']:.2f}× |")
    return "\n".join(rows) + _footer(d, "latency.py")


def serving_table() -> str:
    d = _load("serving")
    if d is None:
        return "_not measured yet_"
    slo = d["slo"]["ttft_p95_s"]
    rows = ["| system | highest rate with p95 TTFT ≤ {:g} s | first rate over the SLO: p95 TTFT | "
            "output tok/s at the sustained rate |".format(slo), "|---|---:|---:|---:|"]
    for name, s in d["systems"].items():
        pts = s["points"]
        over = next((p for p in pts if not p["meets_slo"]), None)
        at = next((p for p in pts if p["request_rate"] == s["max_sustained_rate"]), None)
        over_txt = f"{over['request_rate']:g} req/s: {over['ttft_p95_s']:.2f} s" if over else "none in the sweep"
        rate_txt = f"{s['max_sustained_rate']:g} req/s" if s["max_sustained_rate"] else f"< {pts[0]['request_rate']:g} req/s"
        tok_txt = f"{at['output_tok_s']:.1f}" if at else "–"
        rows.append(f"| {name} | {rate_txt} | {over_txt} | {tok_txt} |")
    ratio = d.get("kiln_over_peer_sustained_rate")
    names = list(d["systems"])
    if ratio is not None:
        note = f"\n\nkiln sustains **{ratio:.1f}×** the request rate of the peer at the same SLO"
        fails = [next((p["request_rate"] for p in d["systems"][n]["points"] if not p["meets_slo"]), None) for n in names]
        if None not in fails:
            lo = d["systems"][names[0]]["max_sustained_rate"] / fails[1]
            hi = fails[0] / d["systems"][names[1]]["max_sustained_rate"]
            note += (f" (the sweep's rate grid bounds the true ratio between {lo:.0f}× and {hi:.0f}×: each "
                     f"system's limit lies between its last sustained and first failed rate).")
        else:
            note += "."
    elif len(names) == 2:
        kiln_rate = d["systems"][names[0]]["max_sustained_rate"]
        lowest = d["systems"][names[1]]["points"][0]["request_rate"]
        note = (f"\n\nThe peer missed the SLO even at the lowest rate tried ({lowest:g} req/s), so the ratio is only "
                f"bounded: kiln sustains **more than {kiln_rate / lowest:.0f}×** its request rate.")
    else:
        note = ""
    return "\n".join(rows) + note + _footer(d, "serving.py")


def quant_kernels_table() -> str:
    d = _load("quant_kernels")
    if d is None:
        return "_not measured yet_"
    panel = "panel_fp32" in next(iter(d["step_ms_by_M"].values()))
    rows = ["| batch M | block kernel (ms) | resident bf16 GEMM (ms) | kernel is | kernel, fp32 activations (ms) "
            "| resident fp32 GEMM (ms) | kernel is |" + (" panel kernel, fp32 (ms) | panel is |" if panel else ""),
            "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if panel else "")]
    for m, v in d["step_ms_by_M"].items():
        rows.append(f"| {m} | {v['kernel']:.2f} | {v['bf16_resident']:.2f} | {v['kernel_speedup']:.2f}× | "
                    f"{v['kernel_fp32_act']:.2f} | {v['fp32_resident']:.2f} | {v['kernel_speedup_vs_fp32']:.2f}× |"
                    + (f" {v['panel_fp32']:.2f} | {v['panel_speedup_vs_fp32']:.2f}× |" if panel else ""))
    panel_note = ""
    if panel:
        first, last = d.get("kiln_panel_rows", (None, None))
        panel_note = (f"\n\nWith fp32 activations (the default here) the panel kernel beat the block kernel from "
                      f"M={d['panel_beats_block_from_M']} and the resident fp32 GEMM up to "
                      f"M={d['panel_beats_fp32_up_to_M']} in this run"
                      + (f"; kiln runs the block kernel below M={first}, the panel kernel for M={first}–{last} "
                         f"(`PANEL_ROWS` in kiln/layers/gguf_quant.py) and the fp32 GEMM above" if first else "")
                      + ".")
    per = {r["layer"]: r for r in d["rows"] if r["M"] == 1}
    layer_note = ", ".join(f"{name} {r['bf16_resident_us'] / r['kernel_us']:.2f}×" for name, r in per.items())
    avx2 = _load("quant_kernels_haswell")
    avx2_note = ""
    if avx2 is not None:
        by_m = ", ".join(f"M={m} {v['kernel_speedup']:.2f}×" for m, v in list(avx2["step_ms_by_M"].items())[:4])
        avx2_note = (f"\n\nThe AVX2 path (the same kernels built with `KILN_KERNEL_MARCH=haswell`, as a CPU without "
                     f"AVX-512 runs them; measured on this machine), bf16 time / kernel time: {by_m} — "
                     f"`benchmarks/results/quant_kernels_haswell.json`, {avx2['date']}.")
    return ("All matmuls of one decode step of the default model (30 layers of Q4_1 qkv/o/gate_up/down, "
            "distinct weights per layer, plus the Q8_0 LM head).\n\n" + "\n".join(rows)
            + f"\n\nPer layer at M=1 (bf16 time / kernel time, summed over the 30 layers): {layer_note}."
            + panel_note + avx2_note
            + "\n\n_From `benchmarks/quant_kernels.py` → `benchmarks/results/quant_kernels.json`, one run, "
            + f"{d['date']}, {d['machine']}, {d['threads']} threads._")


def spec_decode_table() -> str:
    d = _load("spec_decode")
    if d is None:
        return "_not measured yet_"
    if "workloads" not in d:  # a result written before workload (b) existed: workload (a) only
        d = {**d, "workloads": {"code_edit_ngram": {
            "title": d["workload"] + ", n-gram k=8", "date": d["date"],
            "runs": {b: {**r, "speculation_on": r["ngram_k8"]} for b, r in d["runs"].items()}}}}
    rows = ["| workload | requests at once | speculation off (tok/s) | on (tok/s) | speedup | decode only (prefill excluded) | acceptance | draft time | same output |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for w in d["workloads"].values():
        for name, r in w["runs"].items():
            on = r["speculation_on"]
            acc, share = on.get("spec_acceptance_rate"), on.get("spec_draft_time_share")
            decode = r.get("decode_speedup")
            decode_cell = "–" if decode is None else (f"{decode:.2f}× ({r['speculation_off']['decode_tok_s']:.0f} → "
                                                      f"{on['decode_tok_s']:.0f} tok/s)")
            rows.append(f"| {w['title']} | {name.removeprefix('batch_')} | {r['speculation_off']['output_tok_s']:.1f} | "
                        f"{on['output_tok_s']:.1f} | {r['speedup']:.2f}× | {decode_cell} | {'–' if acc is None else f'{100 * acc:.0f}%'} | "
                        f"{'–' if not share else f'{100 * share:.0f}%'} | {'yes' if r['outputs_identical'] else 'no'} |")
    dates = ", ".join(sorted({w["date"] for w in d["workloads"].values()}))
    # Results written before batch 1 was swept always-on stored the main (adaptive) run's figure there: left out.
    sweeps = [f"{w['title']}: " + ", ".join(f"{b} → {x:.2f}×" for b, x in w["always_on_speedup_by_batch"].items()
                                           if b != "1" or w.get("always_on_batch_1_measured"))
              for w in d["workloads"].values() if "always_on_speedup_by_batch" in w]
    if sweeps:
        rows.append("\nSpeedup with the switch-off disabled (speculation in every step), by requests at once:\n\n"
                    + "\n".join(f"- {line}" for line in sweeps))
    return (f"Greedy, {d['num_prompts']} prompts per workload, up to {d['max_tokens']} new tokens.\n\n" + "\n".join(rows)
            + f"\n\n_From `benchmarks/spec_decode.py` → `benchmarks/results/spec_decode.json`, one run per workload, "
            + f"{dates}, {d['threads']} threads._")


def quant_quality_table() -> str:
    d = _load("quant_quality")
    if d is None:
        return "_not measured yet_"
    return (f"WikiText-2 test, {d['chunks']} windows of {d['ctx']} tokens (llama.cpp's chunking: second half of each "
            f"window scored, {d['tokens_scored']} tokens); calibration: {d['calibration']}.\n\n"
            + "\n".join(quality_rows(d["results"]))
            + f"\n\n_From `benchmarks/quant_quality.py` → `benchmarks/results/quant_quality.json`, one run, "
            + f"{d['date']}, {d['machine']}, {d['threads']} threads._")


def perplexity_table() -> str:
    d = _load("perplexity")
    if d is None:
        return "_not measured yet_"
    k, l = d["kiln"], d["llama_cpp"]
    return (f"Perplexity of the default GGUF ({d['file']}) on WikiText-2 test, {d['chunks']} windows of {d['ctx']} tokens, "
            f"llama.cpp's chunking: kiln **{k['ppl']:.4f} ± {k['ppl_stderr']:.4f}** ({k['how']}), llama.cpp "
            f"**{l['ppl']:.4f} ± {l['ppl_stderr']:.4f}** ({l['how']}): kiln/llama.cpp = {d['ratio_kiln_over_llama_cpp']:.4f}."
            f"\n\n_From `benchmarks/perplexity.py` → `benchmarks/results/perplexity.json`, one run, {d['date']}, "
            f"{d['machine']}, {d['threads']} threads._")


def vs_llamacpp_table() -> str:
    d = _load("vs_llamacpp")
    if d is None:
        return "_not measured yet_"
    k, u, lc, r, t = d["kiln"], d["kiln_unfused"], d["llama_cpp"], d["ratios"], d["targets"]

    def verdict(ratio: float | None, target: float) -> str:
        if ratio is None:
            return "not measured"
        return f"**{ratio:.2f}×** (target ≥ {target:g}×: {'met' if ratio >= target else 'missed'})"

    rows = ["| measure | kiln | kiln, op-by-op decode | llama.cpp | kiln / llama.cpp |", "|---|---:|---:|---:|---|",
            f"| decode tok/s, 1 stream ({d['decode_tokens']} tokens after a {d['prompt_tokens']}-token chat prompt) | "
            f"{k['decode_tok_s']:.1f} | {u['decode_tok_s']:.1f} | {lc['decode_tok_s']:.1f} | "
            f"{verdict(r['decode_kiln_over_llama_cpp'], t['decode'])} |",
            f"| prefill tok/s ({d['prefill_tokens']}-token prompt) | {k['prefill_tok_s']:.0f} | {u['prefill_tok_s']:.0f} | "
            f"{lc['prefill_tok_s']:.0f} | {verdict(r['prefill_kiln_over_llama_cpp'], t['prefill'])} |"]
    conc = d["concurrent"]
    kiln_c = conc["kiln serve"]
    peers = {n: v for n, v in conc.items() if n != "kiln serve"}
    if peers:
        best = r["best_llama_server"]
        rows.append(f"| output tok/s, 64 concurrent streaming requests | {kiln_c['output_tok_s']:.0f} | — | "
                    f"{conc[best]['output_tok_s']:.0f} (`{best}`) | "
                    f"{verdict(r['concurrent_kiln_over_best_llama_server'], t['concurrent'])} |")
        others = "; ".join(f"`{n}` {v['output_tok_s']:.0f} tok/s (TTFT p50 {v['ttft_p50_s']:.1f} s"
                           + (f", {v['errors']} of {v['requests']} requests dropped by the server" if v["errors"] else "")
                           + (f", {v['retried_requests']} requests retried after a dropped connection"
                              if v.get("retried_requests") else "")
                           + ")" for n, v in peers.items())
        runs = kiln_c.get("runs", [])
        runs_note = (f"kiln serve ran before and after the llama-server runs ("
                     + " and ".join(f"{run['output_tok_s']:.0f}" for run in runs)
                     + " tok/s; the table has their mean); " if len(runs) > 1 else "")
        conc_note = (f"\n\nAt 64 concurrent requests ({kiln_c['requests']} GSM8K chat requests, ≤ 128 tokens each): "
                     f"{runs_note}kiln TTFT p50 {kiln_c['ttft_p50_s']:.2f} s, p95 {kiln_c['ttft_p95_s']:.2f} s"
                     + (f", {kiln_c['errors']} requests failed" if kiln_c["errors"] else "")
                     + f"; llama-server: {others}.")
    else:
        conc_note = "\n\nllama-server was not given to this run, so the 64-concurrency row is missing."
    prof = k.get("profile", {}).get("decode_step")
    prof_note = ""
    if prof:
        fams = ", ".join(f"{name} {ms:.2f}" for name, ms in prof["op_families_ms"].items() if ms >= 0.05)
        regions = prof["engine_regions_ms"]
        prof_note = (f"\n\nWhere one decode step's {prof['step_ms']:.2f} ms go (under the profiler, ms): {fams}; "
                     f"time not in any of those ops (Python, dispatch, scheduling, sampling, other ops) "
                     f"{prof['other_ops_python_dispatch_ms']:.2f}; the LM head + sampling region, whose matmul is "
                     f"in the block-kernel figure, takes {regions.get('logits_and_sample', 0):.2f}.")
    bw = d.get("memory_read_gb_s")
    bw_note = (f"\n\nThis machine's read bandwidth during the run: {bw['start']:.1f} GB/s at its start, "
               f"{bw['end']:.1f} GB/s at its end (a bound on any single-stream decode, which reads every "
               f"weight once per token; it varied from run to run on this machine)." if bw and "end" in bw else "")
    return ("\n".join(rows) + conc_note + prof_note + bw_note
            + f"\n\nkiln's decode path: {k['decode_path']}; llama-cpp-python {lc.get('version', '?')}; "
            + (f"single-stream figures are medians of {d['rounds'] * d['repeats']} runs each, in {d['rounds']} "
               f"rounds that alternate the systems." if "rounds" in d else f"median of {d['repeats']} runs each.")
            + _footer(d, "vs_llamacpp.py"))


def fused_kernels_table() -> str:
    d = _load("fused_kernels")
    if d is None:
        return "_not measured yet_"
    rows = ["| kernel | dtype | rows | fused (µs) | unfused torch ops (µs) | fused is | max abs diff |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        rows.append(f"| {r['kernel']} | {r['dtype']} | {r['rows']} | {r['fused_us']:.1f} | {r['unfused_us']:.1f} | "
                    f"{r['speedup']:.2f}× | {r['max_abs_diff']:.1e} |")
    return ("\n".join(rows) + f"\n\n_From `benchmarks/fused_kernels.py` → `benchmarks/results/fused_kernels.json`, "
            f"one run, {d['date']}, {d['machine']}, {d['threads']} threads. SiLU·gate runs natively in float32 "
            "(an AVX-512 loop) and as torch's two ops in bfloat16, where the native loop does not vectorize — "
            "in the op-by-op path and the fused decode step alike._")


def serve_single_stream_table() -> str:
    d = _load("serve_single_stream")
    if d is None:
        return "_not measured yet_"
    base = d["single_stream"]["kiln serve"]["decode_tok_s"]
    rows = ["| single stream, greedy, 128 tokens | decode tok/s | kiln serve / this |", "|---|---:|---:|"]
    for name, r in d["single_stream"].items():
        runs = ", ".join(f"{x:.0f}" for x in r["runs"])
        rows.append(f"| {name} | {r['decode_tok_s']:.1f} (runs {runs}) | {base / r['decode_tok_s']:.2f}× |")
    conc = d["concurrent_64"]
    lines = [f"{name}: {r['output_tok_s']:.0f} output tok/s (TTFT p50 {r['ttft_p50_s']:.2f} s, p95 "
             f"{r['ttft_p95_s']:.2f} s, {r['errors']} errors)" for name, r in conc.items()]
    return ("\n".join(rows) + "\n\n64 concurrent streaming clients (128 GSM8K chat requests): " + "; ".join(lines)
            + f".\n\n_From `benchmarks/serve_single_stream.py` → `benchmarks/results/serve_single_stream.json`, one run, "
            f"{d['date']}, {d['machine']}, {d['threads']} threads per system; {d['rounds']} rounds alternating the "
            f"systems, each a fresh process, {d['repeats']} streams per round (median)._")


def soak_table() -> str:
    d = _load("soak")
    if d is None:
        return "_not measured yet_"
    mib = 2 ** 20
    first, final = d["samples"][0], d["final"]
    peak = max(d["samples"], key=lambda s: s["rss_bytes"])
    verdict = {True: "met", False: "**missed**"}
    v = d["verdicts"]
    kinds = ", ".join(f"{k} {r.get('completed_whole', 0)}/{r['sent']}" for k, r in sorted(d["by_kind"].items()))
    statuses = ", ".join(f"{k}: {n}" for k, n in sorted(d["by_status"].items()))
    growth = d["rss_growth_frac"]
    window = d["rss_growth_window"]
    rows = [
        "| measure | value | target |", "|---|---|---|",
        f"| load | {d['load_s'] / 60:.1f} min open-loop, {d['rate']} req/s Poisson + a burst of {d['burst_size']} every "
        f"{d['burst_every_s'] / 60:.0f} min (--max-queue {d['max_queue']}), drained in {d['drain_s']:.0f} s | ≥ 30 min |",
        f"| requests | {d['requests']} (HTTP status: {statuses}; 0 = abandoned by the client on purpose) | |",
        f"| completed whole, by kind | {kinds} | every completed response whole: {verdict[v['every_completed_response_whole']]} |",
        f"| refused | {d['refused_503']} × 503, all with Retry-After | {verdict[v['refused_are_503_with_retry_after']]} |",
        f"| other errors | {d['other_errors']} (5xx other than 503: "
        f"{'none' if v['no_5xx_but_queue_503'] else 'some'}) | none: {verdict[v['no_5xx_but_queue_503'] and v['no_client_errors']]} |",
        f"| KV blocks in use | {first['kv_blocks_in_use']:.0f} at the start, {final['kv_blocks_in_use']:.0f} after the load "
        f"(of {d['kv_blocks_total']:.0f}) | back to 0: {verdict[v['kv_blocks_back_to_zero']]} |",
        f"| RSS | {first['rss_bytes'] / mib:.0f} MiB at the start, peak {peak['rss_bytes'] / mib:.0f}, "
        f"{final['rss_bytes'] / mib:.0f} after; growth {growth * 100:+.2f} % from minute {window[0] / 60:.0f} to "
        f"{window[1] / 60:.0f} | < 2 % over the last 20 min: {verdict[v['rss_growth_last_20_min_under_2pct']]} |",
        f"| threads, open fds | {first['threads']} → {final['threads']}, {first['open_fds']} → {final['open_fds']} | steady |",
    ]
    return ("\n".join(rows) + "\n\n![p95 latency, RSS and KV blocks per minute](benchmarks/results/soak.svg)"
            + f"\n\n_From `benchmarks/soak.py` → `benchmarks/results/soak.json` (+ `soak.svg`), one run, {d['date']}, "
            f"{d['machine']}, {d['threads']} thread{'s' if d['threads'] != 1 else ''}; `{d['command']}`._")


from kiln.bench.report_plan import plan_advise_table  # noqa: E402 (the planner's section, issue 18)
from kiln.bench.report_dense import dense_decode_table  # noqa: E402 (dense weights' decode kernel, issue 21)
from kiln.bench.report_replicas import replicas_table  # noqa: E402 (replicas on Ray Serve, issue 17)
from kiln.bench.report_lora import lora_serving_table  # noqa: E402 (LoRA serve vs merge, issue 20)
from kiln.bench.report_offload import weight_offload_load_table, weight_offload_table  # noqa: E402 (issue 19)
from kiln.bench.report_quant import (foreign_decode_table, foreign_quality_table,  # noqa: E402
                                     kquant_quality_table, quality_rows)
from kiln.bench.report_peers import (concurrent_peers_table, gemma3_decode_table,  # noqa: E402
                                     gemma3_perplexity_table, kernel_tune_table,
                                     kquant_decode_smollm2_table, single_stream_peers_table)

TABLES = {"plan_advise": plan_advise_table, "vs_llamacpp": vs_llamacpp_table, "fused_kernels": fused_kernels_table, "throughput": throughput_table, "latency": latency_table, "serving": serving_table,
          "serve_single_stream": serve_single_stream_table,
          "quant_kernels": quant_kernels_table, "spec_decode": spec_decode_table,
          "quant_quality": quant_quality_table, "perplexity": perplexity_table, "soak": soak_table,
          "quant_quality_issue24": foreign_quality_table, "foreign_decode": foreign_decode_table,
          "single_stream_peers": single_stream_peers_table, "kernel_tune": kernel_tune_table,
          "concurrent_peers": concurrent_peers_table, "gemma3_decode": gemma3_decode_table,
          "kquant_decode_smollm2": kquant_decode_smollm2_table, "gemma3_perplexity": gemma3_perplexity_table,
          "replicas": replicas_table, "lora_serving": lora_serving_table,
          "weight_offload": weight_offload_table, "weight_offload_load": weight_offload_load_table, "kquant_quality": kquant_quality_table,
          "dense_decode": dense_decode_table,
          # the same benchmarks on a second machine kind (an AVX2-only AMD EPYC, no AVX-512): their own files
          "single_stream_peers_avx2": lambda: single_stream_peers_table("single_stream_peers_avx2"),
          "concurrent_peers_avx2": lambda: concurrent_peers_table("concurrent_peers_avx2"),
          "kernel_tune_avx2": lambda: kernel_tune_table("kernel_tune_avx2")}


def render(readme: str) -> str:
    for name, fn in TABLES.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        readme = pattern.sub(lambda m: m.group(1) + fn() + "\n" + m.group(2), readme)
    return readme
