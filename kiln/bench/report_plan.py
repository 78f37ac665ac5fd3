"""The README's `kiln plan` / `kiln advise` section, rendered from benchmarks/results/plan_advise.json.

Registered in kiln.bench.report.TABLES as "plan_advise"; a separate module so the planner's tables stay
out of the other benchmarks' renderers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "plan_advise.json"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e10 else f"{n / 1e9:.2f} GB"


def _gain(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.0f} %"


def _advise_section(conc: str, r: dict[str, Any]) -> list[str]:
    p = r["profile"]
    runs = " and ".join(f"{x:.1f}" for x in r["baseline"]["output_tok_s_runs"])
    out = [f"**Chat at {conc} concurrent request{'s' if conc != '1' else ''}** ({p['num_requests']} requests; baseline "
           f"`{r['baseline']['config']}`, output tok/s {runs} in its two runs): prefill "
           f"{100 * p['prefill_time_share']:.0f} % of the time, decode step median {p['decode_step_ms_median']:.1f} ms, "
           f"TTFT p95 {p['ttft_p95_s']:.2f} s, TPOT p95 {1e3 * p['tpot_p95_s']:.0f} ms, KV peak "
           f"{100 * p['kv_usage_peak']:.1f} %, {p['preemptions']} preemptions.", ""]
    out += ["| question | answer | evidence |", "|---|---|---|"]
    out += [f"| {q['question']} | {q['answer']} | {q['evidence']} |" for q in r["questions"]]
    out += ["", "| recommendation | change | why | predicted | measured | KL vs baseline | top-1 | verdict |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for rec in r["recommendations"] + r["dropped"]:
        change = ", ".join(f"`{k}={v}`" for k, v in rec["settings"].items())
        out.append(f"| {rec['name']} | {change} | {rec['reason']} | {_gain(rec['predicted_gain'])} | "
                   f"{_gain(rec['measured_gain'])} | {rec['quality_kl']:.4f} | {100 * rec['quality_top1']:.1f} % | "
                   f"{rec['verified']} |")
    for rec in r["unverified"]:
        out.append(f"| {rec['name']} | – | {rec['reason']} | {_gain(rec['predicted_gain'])} | not verified | – | – | "
                   "ranked below the verified ones |")
    return out


def plan_advise_table() -> str:
    if not RESULT.exists():
        return "_not measured yet_"
    d = json.loads(RESULT.read_text())
    s = d["seventy_b"]
    lines = [f"Llama 3 70B, fp16, {s['context']:,} tokens, one sequence ({s['layers']} layers, hidden {s['hidden']}, "
             f"{s['query_heads']} query heads, {s['kv_heads']} KV heads of {s['head_dim']}):", "",
             "| | seed formula (every head cached) | `kiln plan` (GQA: KV heads only) |", "|---|---:|---:|",
             f"| weights | {_gb(s['weights_bytes'])} | {_gb(s['weights_bytes'])} |",
             f"| KV cache | **{_gb(s['kv_seed_formula_bytes'])}** (2 × {s['layers']} × {s['hidden']} × {s['context']} × 2 B) | "
             f"**{_gb(s['kv_gqa_bytes'])}** (2 × {s['layers']} × {s['kv_heads']} × {s['head_dim']} × {s['context']} × 2 B) |",
             f"| activations at a 512-token step | – | {_gb(s['activations_bytes'])} |", ""]
    lines += ["Predicted (`kiln plan`, from this run's calibration) against measured (the engine, same run), default model. "
              "Calibration and measurements alike take the 10th-percentile decode step and the fastest of 3 prefills, "
              "the step's own cost on a CPU shared with other work (medians in brackets):",
              "", "| configuration | decode tok/s measured | predicted | measured / predicted | prefill tok/s (1,024) "
              "measured | predicted | measured / predicted |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in d["checks"]:
        m, p = c["measured"], c["predicted"]
        pre = (f"{m['prefill_tok_s']:.0f} ({m['prefill_tok_s_median']:.0f}) | {p['prefill_tok_s']:.0f} | "
               f"{c['ratio_prefill']:.2f}" if "ratio_prefill" in c else "– | – | –")
        lines.append(f"| {c['config']} | {m['decode_tok_s']:.1f} ({m['decode_tok_s_median']:.1f}) | {p['decode_tok_s']:.1f} | "
                     f"{c['ratio_decode']:.2f} | {pre} |")
    ratios = [r for c in d["checks"] for r in (c["ratio_decode"], c.get("ratio_prefill")) if r is not None]
    within = sum(0.75 <= r <= 1.25 for r in ratios)
    lines += ["", f"{within} of {len(ratios)} predictions within 25 % of the measurement."]
    kv = d["kv_quality"]
    lines += ["", "KV cache quality (teacher-forced decode over a fixed WikiText-2 passage, vs the fp16 cache): "
              + "; ".join(f"{k} mean KL {v['kl']:.5f}, top-1 {100 * v['top1']:.1f} %" for k, v in kv.items()) + "."]
    for conc, r in d["advise"].items():
        lines += [""] + _advise_section(conc, r)
    cal = d["calibration"]
    when = (f"calibration and checks {d['date']}, advise runs {d['advise_date']}" if d.get("advise_date", d["date"]) != d["date"]
            else f"one run, {d['date']}")
    lines.append(f"\n_From `benchmarks/plan_advise.py` → `benchmarks/results/plan_advise.json`, {when}, "
                 f"{d['machine']}, {d['threads']} threads; calibration read bandwidth "
                 f"{cal['read_bytes_per_s'] / 1e9:.1f} GB/s; on a CPU shared with other work"
                 + (f" (1-minute load average {d['load_average_start']:.1f} at the start, {d['load_average_end']:.1f} at "
                    f"the end, on {d['machine'].split(',')[1].strip()})" if "load_average_end" in d else "")
                 + ("; run at real-time priority (SCHED_FIFO), so that work waited while it measured"
                    if d.get("scheduling") == "SCHED_FIFO" else "") + "._")
    return "\n".join(lines)
