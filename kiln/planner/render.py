"""Text tables for `kiln plan` (the budget, the fixes, the predictions). Pure formatting: no arithmetic here."""

from __future__ import annotations

from typing import Any

from kiln.planner.fits import Fix
from kiln.planner.memory import Budget, MemoryPlan


def gib(n: float) -> str:
    """Bytes in decimal units (GB = 1e9, as model cards and the seed documents quote them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


def _budget_rows(b: Budget, context: int, concurrency: int) -> list[tuple[str, int | None, str]]:
    rows: list[tuple[str, int | None, str]] = [("weights", b.weights_bytes, "")]
    rows += [(f"  {k}", v, "") for k, v in b.weights.items() if v]
    rows.append(("KV cache", b.kv_cache_bytes, f"{gib(b.kv_per_token_bytes)}/token; {context} tokens x {concurrency}"))
    rows.append(("activations + work buffers", b.activations_bytes, ""))
    rows += [(f"  {k}", v, "") for k, v in b.activations.items()]
    if b.draft_bytes:
        rows.append(("draft model", b.draft_bytes, ""))
    rows.append(("total", b.total_bytes, ""))
    if b.mapped_weight_bytes:
        rows.append(("mapped from disk (not in RAM)", b.mapped_weight_bytes, "--max-weight-memory: streamed every step"))
    return rows


def plan_table(plan: MemoryPlan, memory: int | None, fits: bool | None) -> str:
    a, req = plan.source.arch, plan.request
    head = (f"{a.name} ({plan.source.origin}): {a.num_layers} layers, hidden {a.hidden_size}, {a.num_heads} query / "
            f"{a.num_kv_heads} KV heads x {a.head_dim}{' (GQA)' if a.is_gqa else ' (MHA)'}, vocab {a.vocab_size}, "
            f"{'tied' if a.tie_word_embeddings else 'untied'} embeddings")
    setup = (f"weights {req.weights}, KV {req.kv_cache_dtype}, context {plan.context}, concurrency {req.concurrency}, "
             f"token budget {req.max_num_batched_tokens}, TP {req.tensor_parallel_size}, device {req.device}")
    tp = req.tensor_parallel_size
    whole = _budget_rows(plan.whole, plan.context, req.concurrency)
    rank = _budget_rows(plan.per_rank, plan.context, req.concurrency)
    width = max(len(r[0]) for r in whole) + 2
    lines = [head, setup, "", f"{'':{width}}{'whole model':>12}" + (f"{'per rank':>12}" if tp > 1 else "")]
    for (name, v, note), (_, rv, _) in zip(whole, rank):
        lines.append(f"{name:{width}}{gib(v or 0):>12}" + (f"{gib(rv or 0):>12}" if tp > 1 else "")
                     + (f"   {note}" if note else ""))
    lines.append("")
    lines.append(f"seed formula KV (2 x layers x hidden x tokens x 2 bytes, every head cached): {gib(plan.seed_kv_bytes)} "
                 f"vs {gib(plan.whole.kv_cache_bytes)} here ({plan.seed_kv_bytes / max(plan.whole.kv_cache_bytes, 1):.1f}x)")
    lines += [f"note: {n}" for n in plan.whole.notes]
    if memory is not None:
        verdict = "fits" if fits else "does NOT fit"
        lines.append(f"memory: {gib(plan.per_rank.total_bytes)} {'per rank ' if tp > 1 else ''}of {gib(memory)}: {verdict}")
    return "\n".join(lines)


def fixes_table(fixes: list[Fix]) -> str:
    if not fixes:
        return "no single change makes it fit (offloading layers is not in kiln yet: kiln issue 19)"
    lines = ["cheapest changes that make it fit:"]
    for f in fixes:
        lines.append(f"  {f.change:24s} {gib(f.total_bytes):>10}   cost: {f.cost}")
    lines.append("  (offloading layers to CPU/disk: not in kiln yet, kiln issue 19)")
    return "\n".join(lines)


def predictions_table(pred: dict[str, Any]) -> str:
    lines = [f"predicted on this machine ({pred['calibration']}):"]
    for key, label in (("decode_tok_s", "single-stream decode"), ("prefill_tok_s", "prefill"),
                       ("batched_decode_tok_s", f"decode at {pred['concurrency']} concurrent")):
        lines.append(f"  {label:28s} {pred[key]:8.1f} tok/s   ({pred['why'][key]})")
    return "\n".join(lines)
