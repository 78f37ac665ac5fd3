"""`kiln advise`'s text report (the JSON report is the advisor's dict itself)."""

from __future__ import annotations

from typing import Any


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.0f} %"


def advise_text(r: dict[str, Any]) -> str:
    p = r["profile"]
    lines = [f"kiln advise: {r['model']}, workload {r['workload']}, concurrency {r['concurrency']}, baseline "
             f"{r['baseline']['config'] or 'defaults'}",
             f"profile: {p['output_tok_s']:.1f} output tok/s ({p['num_requests']} requests), prefill "
             f"{100 * p['prefill_time_share']:.0f} % of the time, decode step {p['decode_step_ms_median']:.1f} ms, "
             f"TTFT p95 {p['ttft_p95_s']:.2f} s, TPOT p95 {1e3 * p['tpot_p95_s']:.0f} ms, KV peak "
             f"{100 * p['kv_usage_peak']:.1f} %, prefix hits {100 * p['prefix_cache_hit_rate']:.0f} %", ""]
    for q in r["questions"]:
        lines.append(f"{q['question']:48s} {q['answer']}\n    evidence: {q['evidence']}")
    lines.append("")
    if not r["recommendations"]:
        lines.append("no recommendation measured better than the baseline")
    for i, rec in enumerate(r["recommendations"], 1):
        lines.append(_rec_line(f"{i}.", rec))
    for rec in r["dropped"]:
        lines.append(_rec_line("dropped:", rec))
    for rec in r["unverified"]:
        lines.append(f"not verified: {rec['name']} (predicted {_pct(rec['predicted_gain'])})")
    base = r["baseline"]
    if base["slo_pass"] is not None or base["cost_per_mtok"] is not None:
        lines.append(f"baseline: SLO {'pass' if base['slo_pass'] else 'fail' if base['slo_pass'] is not None else '–'}"
                     + (f", ${base['cost_per_mtok']:.2f} per Mtok" if base["cost_per_mtok"] is not None else ""))
    return "\n".join(lines)


def _rec_line(tag: str, rec: dict[str, Any]) -> str:
    extra = ""
    if rec.get("slo_pass") is not None:
        extra += f", SLO {'pass' if rec['slo_pass'] else 'fail'}"
    if rec.get("cost_per_mtok") is not None:
        extra += f", ${rec['cost_per_mtok']:.2f}/Mtok"
    kl = f"KL {rec['quality_kl']:.4f}, top-1 {100 * rec['quality_top1']:.1f} %" if rec.get("quality_kl") is not None else ""
    return (f"{tag} {rec['name']} {rec['settings']}: predicted {_pct(rec['predicted_gain'])}, measured "
            f"{_pct(rec['measured_gain'])}; {kl}{extra}\n    why: {rec['reason']}")
