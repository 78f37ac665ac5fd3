"""The decision table, as code: a measured profile → answers to the four questions → ranked recommendations.

Pure functions over a `Profile` (kiln.planner.profile) and the baseline engine options, so the rules are
tested on synthetic profiles. Thresholds (each a measured quantity of the profile):
- prefill-bound when steps that compute prompt tokens take >= 50 % of the time;
- the KV cache limits capacity when its peak use is >= 90 % or any request was preempted;
- batching is stable when decode steps run >= 80 % of the intended sequences, nothing was preempted
  and the decode step time's spread (p90 - p10) / median stays under 2 (a shared CPU's stalls alone
  reach ~1);
- n-gram speculation is worth verifying at <= 2 sequences (kiln switches it off above) when replaying the
  measured outputs through the prompt-lookup proposer yields >= 1.3 tokens per verify step.
A recommendation's predicted gain combines the predicted prefill and decode speedups of the change with
the measured time split (Amdahl): gain = 1 / (p / s_prefill + (1 - p) / s_decode) - 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from kiln.planner.profile import Profile

PREFILL_BOUND = 0.5
KV_LIMIT = 0.9
STABLE_OCCUPANCY = 0.8
STABLE_SPREAD = 2.0
NGRAM_MIN_TOKENS_PER_STEP = 1.3


class SpeedModel(Protocol):
    """Predicted (prefill speedup, decode speedup) of applying `change` to the baseline, at `concurrency`;
    None when the model cannot say."""

    def speedups(self, change: dict[str, Any], concurrency: int) -> tuple[float, float] | None: ...


@dataclass
class Question:
    question: str
    answer: str
    evidence: str


@dataclass
class Recommendation:
    """One change (EngineArgs field → value), why, and what it is predicted to buy and cost."""

    name: str
    settings: dict[str, Any]
    reason: str
    predicted_gain: float  # fractional throughput gain, 0.25 = +25 %
    quality_expected: str
    measured_gain: float | None = None
    quality_kl: float | None = None
    quality_top1: float | None = None
    slo_pass: bool | None = None
    cost_per_mtok: float | None = None
    verified: str = "not verified"  # "better", "worse (dropped)", "not verified"
    profile: dict[str, Any] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def amdahl(prefill_share: float, s_prefill: float, s_decode: float) -> float:
    return 1.0 / (prefill_share / s_prefill + (1 - prefill_share) / s_decode) - 1.0


def questions(p: Profile, baseline: dict[str, Any]) -> list[Question]:
    """The seeds' four questions, answered from the profile."""
    bound = "prefill-bound" if p.prefill_time_share >= PREFILL_BOUND else "decode-bound"
    kv_limited = p.kv_usage_peak >= KV_LIMIT or p.preemptions > 0
    gaps = kernel_gaps(p, baseline)
    stable = p.batch_occupancy >= STABLE_OCCUPANCY and p.preemptions == 0 and p.step_ms_cv < STABLE_SPREAD
    return [
        Question("prefill-bound or decode-bound?", bound,
                 f"{100 * p.prefill_time_share:.0f} % of step time in steps that compute prompt tokens; decode step "
                 f"median {p.decode_step_ms_median:.1f} ms; TTFT p95 {p.ttft_p95_s:.2f} s"),
        Question("is the KV cache the capacity limit?", "yes" if kv_limited else "no",
                 f"peak KV use {100 * p.kv_usage_peak:.1f} %, {p.preemptions} preemptions"),
        Question("are the best kernels for this device in use?", "no: " + "; ".join(gaps) if gaps else "yes",
                 f"linear layers {p.kernels.get('linear_methods')}, activations {p.kernels.get('dtype')}, decode "
                 f"{p.kernels.get('decode_step')}, KV {p.kernels.get('kv_cache')}, AMX {p.kernels.get('amx')}"),
        Question("is batching stable under this traffic?", "yes" if stable else "no",
                 f"decode steps ran {100 * p.batch_occupancy:.0f} % of {p.concurrency} sequences; step time spread "
                 f"{p.step_ms_cv:.2f} of the median; {p.preemptions} preemptions"),
    ]


def kernel_gaps(p: Profile, baseline: dict[str, Any]) -> list[str]:
    """Where this configuration leaves a faster kernel path of this device unused."""
    gaps = []
    k = p.kernels
    if baseline.get("quantized_weights") == "dequantize" and k.get("native_blocks_available"):
        gaps.append("GGUF blocks expanded to dense (native block kernels unused)")
    if k.get("dtype") == "bfloat16" and not k.get("amx") and baseline.get("device", "cpu") == "cpu":
        gaps.append("bf16 activations on a CPU without AMX (kiln measured fp32 faster here)")
    if k.get("dtype") == "float32" and k.get("amx"):
        gaps.append("fp32 activations on an AMX CPU (bf16 tiles unused)")
    if str(k.get("decode_step", "")).startswith("plain path"):
        gaps.append(f"decode steps op by op ({k.get('decode_step')})")
    return gaps


def ngram_tokens_per_step(pairs: list[tuple[list[int], list[int]]], k: int = 4) -> float:
    """Replay measured (prompt, output) pairs through the prompt-lookup proposer: output tokens per verify
    step greedy n-gram speculation with k drafts would have made (1.0 = no gain)."""
    from kiln.spec_decode.ngram_proposer import NgramProposer

    prop = NgramProposer(1, 4)
    tokens = steps = 0
    for prompt, out in pairs:
        pos = 0
        while pos < len(out):
            draft = prop.lookup(prompt + out[:pos], k)
            accepted = 0
            while accepted < len(draft) and pos + accepted < len(out) and draft[accepted] == out[pos + accepted]:
                accepted += 1
            pos += accepted + 1
            steps += 1
        tokens += len(out)
    return tokens / steps if steps else 1.0


def candidates(p: Profile, baseline: dict[str, Any], speed: SpeedModel | None,
               ngram_tps: float | None = None, kv_quality: str = "") -> list[Recommendation]:
    """Every rule that fires, with its predicted gain; ranked by predicted gain, largest first."""
    out: list[Recommendation] = []
    share = p.prefill_time_share
    decode_bound = share < PREFILL_BOUND

    def gain(change: dict[str, Any], fallback: tuple[float, float]) -> float:
        s = speed.speedups(change, p.concurrency) if speed is not None else None
        return amdahl(share, *(s or fallback))

    gaps = kernel_gaps(p, baseline)
    if any(g.startswith("GGUF blocks") for g in gaps):
        change = {"quantized_weights": "auto"}
        out.append(Recommendation(
            "weight quantization: keep the GGUF blocks (native kernels)", change,
            f"{'decode-bound' if decode_bound else 'decode share'} {100 * (1 - share):.0f} % of the time and the "
            f"weights stream as dense {p.kernels.get('dtype')}: the blocks read ~3-6x fewer bytes per token",
            gain(change, (1.0, 2.0)), "none expected: the same GGUF values, computed from their blocks"))
    if any(g.startswith("bf16 activations on a CPU without AMX") for g in gaps):
        change = {"dtype": "float32"}
        out.append(Recommendation(
            "fp32 activations (this CPU has no AMX)", change,
            "kiln measured fp32 ahead of bf16 on AVX-512 CPUs without AMX (kiln.loader.model_loader.resolve_dtype); "
            f"{100 * share:.0f} % of the time is prefill", gain(change, (1.5, 1.0)),
            "none expected: fp32 is the more precise"))
    if any(g.startswith("fp32 activations on an AMX") for g in gaps):
        change = {"dtype": "bfloat16"}
        out.append(Recommendation("bf16 activations (AMX tiles)", change, "the CPU has AMX bf16 tiles",
                                  gain(change, (2.0, 1.0)), "small: bf16 rounding of activations"))
    if str(p.kernels.get("decode_step", "")).startswith("plain path: disabled"):
        change = {"fused_decode_step": True}
        out.append(Recommendation("fused native decode step", change, "decode steps run op by op from Python",
                                  gain(change, (1.0, 1.5)), "none expected (tested identical to the op path)"))
    if p.kv_usage_peak >= KV_LIMIT or p.preemptions > 0:
        if baseline.get("kv_cache_dtype", "auto") not in ("int8", "fp8_e4m3"):
            lost = min(0.5, p.preemptions / max(p.num_requests, 1) * share)
            out.append(Recommendation(
                "int8 KV cache", {"kv_cache_dtype": "int8"},
                f"KV cache is the capacity limit: peak {100 * p.kv_usage_peak:.0f} %, {p.preemptions} preemptions "
                "(each recomputes its prompt); int8 holds ~2x the tokens in the same memory",
                max(lost, 0.05), kv_quality or "small (int8 per token and head)"))
    if (decode_bound and p.concurrency <= 2 and ngram_tps is not None and ngram_tps >= NGRAM_MIN_TOKENS_PER_STEP
            and not baseline.get("speculative_model")):
        change = {"speculative_model": "ngram", "num_speculative_tokens": 4}
        verify_cost = speed.speedups({"_verify_rows": 5}, p.concurrency) if speed is not None else None
        cost = 1 / verify_cost[1] if verify_cost else 1.3  # a 5-row verify step vs a 1-row step
        out.append(Recommendation(
            "n-gram speculation (prompt lookup, k=4)", change,
            f"decode-bound at {p.concurrency} sequence(s) and the measured outputs replayed through the proposer "
            f"give {ngram_tps:.2f} tokens per verify step", amdahl(share, 1.0, ngram_tps / cost),
            "none: greedy verification keeps the target's output"))
    if share >= 0.3 and p.concurrency > 1 and baseline.get("max_num_batched_tokens", 512) < 2048:
        change = {"max_num_batched_tokens": 2048}
        out.append(Recommendation(
            "larger per-step token budget (2048)", change,
            f"{100 * share:.0f} % of the time prefills prompts of {p.concurrency} concurrent requests in "
            f"{baseline.get('max_num_batched_tokens', 512)}-token chunks: fewer, larger steps amortise the per-step "
            "overhead", gain(change, (1.15, 1.0)), "none: the same computation in fewer steps"))
    if baseline.get("max_num_seqs", 64) < p.concurrency:
        change = {"max_num_seqs": p.concurrency}
        out.append(Recommendation(
            f"max_num_seqs {p.concurrency}", change,
            f"only {baseline.get('max_num_seqs')} of {p.concurrency} requests decode at once",
            gain(change, (1.0, p.concurrency / baseline.get("max_num_seqs", 64))), "none"))
    return sorted(out, key=lambda r: -r.predicted_gain)
