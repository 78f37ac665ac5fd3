"""`kiln plan` predictions against kiln's measured speed, and two real `kiln advise` runs, in one run.

1. `kiln plan --calibrate` on this machine (cached), then the default model measured at three
   configurations — Q4_1 native (the default), bf16 dense, int8 KV cache at 16 concurrent sequences —
   next to what `kiln plan` predicts for each (ratio measured / predicted).
2. The quality of int8 / fp8 KV caches (teacher-forced next-token KL and top-1 vs the fp16 cache), which
   `kiln plan` quotes as the cost of a KV change.
3. The seed's 70B / 4K table: Llama 3 70B at fp16, 4,096 tokens, its KV formula against the GQA-correct one.
4. `kiln advise` on the chat workload at 1 and at 32 concurrent requests, from the unoptimized
   configuration (bf16 activations, GGUF blocks expanded to dense).
Writes benchmarks/results/plan_advise.json (the README's "kiln plan and kiln advise" section). 2 threads.
On a CPU shared with other work, run it as `chrt -f 20 python benchmarks/plan_advise.py` (root): real-time
priority keeps the other processes off its cores while it measures; the result file records the policy.
`--checks-only` re-runs parts 1-3 and keeps the file's advise runs (their date is recorded apart).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

THREADS = 2
OUT = Path(__file__).parent / "results" / "plan_advise.json"
UNOPTIMIZED = {"dtype": "bfloat16", "quantized_weights": "dequantize"}
CHECKS = [  # (label, engine options, plan request options, sequences)
    ("Q4_1 native (default: GGUF blocks, fp32 activations)", {}, {}, 1),
    ("bf16 dense (blocks expanded, bf16 activations)", UNOPTIMIZED, {"weights": "bf16", "activation_dtype": "bfloat16"}, 1),
    ("Q4_1 native, int8 KV cache, 16 concurrent", {"kv_cache_dtype": "int8"}, {"kv_cache_dtype": "int8"}, 16),
]


def _engine(opts: dict):
    from kiln.engine.arg_utils import EngineArgs
    from kiln.engine.llm_engine import LLMEngine

    # the engine's default step budget (512 tokens): the 1,024-token prefill runs in two chunks, as a user's would
    # single decode steps: the planner predicts per step (kiln/planner/calibration.py), and this times steps
    return LLMEngine.from_engine_args(EngineArgs.from_kwargs(model="smollm2-135m", threads=THREADS,
                                                             **{"num_scheduler_steps": 1, **opts}))


def measure(opts: dict, seqs: int, decode_steps: int = 48) -> dict:
    """Decode tok/s (seqs / the 10th-percentile pure decode step) and, for one sequence, 1,024-token prefill
    tok/s (the fastest of 3, in the engine's 512-token chunks); the medians beside them."""
    from kiln.planner.calibration import low
    from kiln.sampling_params import SamplingParams

    engine = _engine(opts)
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me about the history of printing."}],
                                                add_generation_prompt=True), add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=decode_steps + 4, ignore_eos=True)
    for i in range(seqs):
        engine.add_request({"prompt_token_ids": [*prompt[:-1], prompt[-1]] if i == 0 else prompt + [i]}, params)
    for _ in range(3):
        engine.step()
    steps = []
    for _ in range(decode_steps):
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    while engine.has_unfinished_requests():
        engine.step()
    # low(): the statistic the calibration uses (the step's own cost on a CPU shared with other work)
    out = {"decode_tok_s": seqs / low(steps), "decode_tok_s_median": seqs / statistics.median(steps),
           "decode_context": len(prompt) + 3 + decode_steps // 2}
    if seqs == 1:
        long = (tok.encode(Path(__file__).read_text()) * 8)[:1024]
        runs = []
        for i in range(3):
            engine.add_request({"prompt_token_ids": [long[0] + i, *long[1:]]}, SamplingParams(temperature=0, max_tokens=1))
            t = time.perf_counter()
            while engine.has_unfinished_requests():  # every chunk of the prompt (max_tokens=1 ends with it)
                engine.step()
            runs.append(time.perf_counter() - t)
        out["prefill_tok_s"] = 1024 / min(runs)
        out["prefill_tok_s_median"] = 1024 / statistics.median(runs)
    out["decode_path"] = engine.loaded.model.decode_plan_status
    del engine
    gc.collect()
    return out


def checks(cal: dict) -> list[dict]:
    from kiln.planner.memory import PlanRequest, plan_memory
    from kiln.planner.predict import predict
    from kiln.planner.sources import resolve_source

    source = resolve_source("smollm2-135m")
    rows = []
    for label, opts, req_opts, seqs in CHECKS:
        print(f"check: {label} ...", file=sys.stderr)
        m = measure(opts, seqs)
        plan = plan_memory(source, PlanRequest(concurrency=seqs, context=1024, **req_opts))
        p = predict(plan, cal, prompt_tokens=1024, decode_context=m["decode_context"], concurrency=seqs)
        row = {"config": label, "engine_options": opts, "sequences": seqs, "measured": m,
               "predicted": {"decode_tok_s": p["batched_decode_tok_s"], "prefill_tok_s": p["prefill_tok_s"],
                             "path": p["path"], "terms_s": p["terms_s"]}}
        row["ratio_decode"] = m["decode_tok_s"] / p["batched_decode_tok_s"]
        if "prefill_tok_s" in m:
            row["ratio_prefill"] = m["prefill_tok_s"] / p["prefill_tok_s"]
        rows.append(row)
        print(f"  measured {m['decode_tok_s']:.1f} / predicted {p['batched_decode_tok_s']:.1f} decode tok/s"
              + (f"; prefill {m['prefill_tok_s']:.0f} / {p['prefill_tok_s']:.0f}" if seqs == 1 else ""), file=sys.stderr)
    return rows


def kv_quality() -> dict:
    from kiln.planner.fidelity import compare, fixed_text_ids, teacher_forced_logprobs

    engine = _engine({})
    ids = fixed_text_ids(engine.tokenizer)
    ref = teacher_forced_logprobs(engine.loaded.model, "auto", ids)
    out = {}
    for kv in ("int8", "fp8_e4m3"):
        kl, top1 = compare(ref, teacher_forced_logprobs(engine.loaded.model, kv, ids))
        out[kv] = {"kl": kl, "top1": top1, "positions": len(ids) - 128, "reference": "fp16 KV cache (auto)"}
    del engine
    gc.collect()
    return out


def seventy_b() -> dict:
    from kiln.planner.memory import PlanRequest, plan_memory
    from kiln.planner.sources import resolve_source

    plan = plan_memory(resolve_source("llama-3-70b"), PlanRequest(weights="fp16", context=4096, device="cuda"))
    a = plan.source.arch
    return {"model": "llama-3-70b", "context": 4096, "bytes_per_value": 2, "layers": a.num_layers,
            "hidden": a.hidden_size, "query_heads": a.num_heads, "kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
            "weights_bytes": plan.whole.weights_bytes, "weights_by_type": plan.whole.weights,
            "kv_gqa_bytes": plan.whole.kv_cache_bytes, "kv_seed_formula_bytes": plan.seed_kv_bytes,
            "activations_bytes": plan.whole.activations_bytes, "total_bytes": plan.whole.total_bytes}


def main() -> None:
    import torch

    from kiln.planner.advisor import advise
    from kiln.planner.calibration import calibrate, cpu_name

    torch.set_num_threads(THREADS)
    checks_only = "--checks-only" in sys.argv  # re-run parts 1-3, keep the advise runs of the file
    t0 = time.time()
    print("calibrating ...", file=sys.stderr)
    cal = calibrate(THREADS, log=lambda s: print(f"  {s}", file=sys.stderr))
    result = {"benchmark": "plan_advise", "model": "smollm2-135m", "threads": THREADS,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}",
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_start": os.getloadavg()[0],
              # `chrt -f 20 python benchmarks/plan_advise.py` runs it ahead of (niced) neighbours on a shared CPU
              "scheduling": "SCHED_FIFO" if os.sched_getscheduler(0) == os.SCHED_FIFO else "normal",
              "calibration": cal, "checks": checks(cal)}
    result["kv_quality"] = kv_quality()
    result["seventy_b"] = seventy_b()
    if checks_only:
        old = json.loads(OUT.read_text())
        result["advise"], result["advise_date"] = old["advise"], old.get("advise_date", old["date"])
        result["advise_wall_s"] = old.get("advise_wall_s", old["wall_s"])
        result["wall_s"] = time.time() - t0
        result["load_average_end"] = os.getloadavg()[0]
        OUT.write_text(json.dumps(result, indent=1))
        print(f"wrote {OUT} (checks re-run, advise runs of {result['advise_date']} kept)", file=sys.stderr)
        return
    result["advise"] = {}
    result["advise_date"] = time.strftime("%Y-%m-%d %H:%M")
    t_advise = time.time()
    for conc, n, max_tokens in ((1, 2, 32), (32, 32, 24)):
        print(f"advise chat at {conc} ...", file=sys.stderr)
        result["advise"][str(conc)] = advise("smollm2-135m", "chat", conc, dict(UNOPTIMIZED), threads=THREADS,
                                             num_requests=n, max_tokens=max_tokens, top_n=2,
                                             log=lambda s: print(f"  {s}", file=sys.stderr))
    result["advise_wall_s"] = time.time() - t_advise
    result["wall_s"] = time.time() - t0
    result["load_average_end"] = os.getloadavg()[0]
    OUT.write_text(json.dumps(result, indent=1))
    print(f"wrote {OUT} in {result['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
