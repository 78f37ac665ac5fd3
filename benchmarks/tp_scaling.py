"""Tensor parallel on one 2-core CPU: decode and prefill tok/s at TP=1 and TP=3 on the default model, side
by side in one run (alternating rounds), and what the difference is made of.

This box cannot show TP paying: three ranks share two cores, and every decode step of the default model's
30 layers costs 62 collectives over gloo (1 embedding all-reduce, 2 per layer, 1 logits all-gather) plus
one broadcast of the step. What it shows is the price of the communication and of leaving the fused native
decode step (TP ranks decode op by op), so the TP=1 engine is also measured op by op on one thread.

Configurations (fp32 activations, Q4_1/Q8_0 blocks on the native kernels, float16 KV cache):
  tp1            TP=1, 2 threads, fused decode step (kiln's default here)
  tp1_1t_opbyop  TP=1, 1 thread, op-by-op decode (what one TP rank runs, without the collectives)
  tp3            TP=3, 1 thread per rank (cores / 3, at least 1: the default), op-by-op decode
Decode: one stream, a chat prompt, 64 greedy tokens (tok/s over the tokens after the first). Prefill: a
512-token WikiText prompt, 1 output token (prompt tokens / time to the first token); prefix caching off.

Writes benchmarks/results/tp_scaling.json. Run: python benchmarks/tp_scaling.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results" / "tp_scaling.json"
CONFIGS: dict[str, dict[str, Any]] = {
    "tp1": {"tensor_parallel_size": 1, "threads": 2},
    "tp1_1t_opbyop": {"tensor_parallel_size": 1, "threads": 1, "fused_decode_step": False},
    "tp3": {"tensor_parallel_size": 3},
}
DECODE_TOKENS = 64
PREFILL_TOKENS = 512


def measure(name: str, options: dict[str, Any], round_: int) -> dict[str, Any]:
    from kiln import LLM, SamplingParams
    from kiln.data import WIKITEXT2_TEST, data_path

    t0 = time.perf_counter()
    llm = LLM("smollm2-135m", dtype="float32", kv_cache_memory="256MiB", enable_prefix_caching=False, **options)
    load_s = time.perf_counter() - t0
    try:
        chat = llm.tokenizer.encode(llm.apply_chat_template(
            [{"role": "user", "content": f"Tell me a story about a lighthouse keeper (take {round_})."}]),
            add_special_tokens=False)
        greedy = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True)
        llm.generate([{"prompt_token_ids": chat}], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        start, first = time.perf_counter(), None
        for out in llm.generate_stream({"prompt_token_ids": chat}, greedy):
            if first is None:
                first = time.perf_counter()
        decode_s = time.perf_counter() - first
        text = data_path(WIKITEXT2_TEST).read_text(encoding="utf-8")
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        offset = 1000 * (round_ + 1)
        prompt = ids[offset:offset + PREFILL_TOKENS]
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=1))
        prefill_s = time.perf_counter() - t
        status = llm.engine.loaded.model.decode_plan_status
    finally:
        llm.engine.close()
    return {"config": name, "round": round_, "options": options, "load_s": round(load_s, 1),
            "decode_tok_s": round((DECODE_TOKENS - 1) / decode_s, 2), "prefill_tok_s": round(PREFILL_TOKENS / prefill_s, 1),
            "ttft_chat_s": round(first - start, 3), "decode_path": status}


def main() -> None:
    from kiln.planner.calibration import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    flags = Path("/proc/cpuinfo").read_text().split()
    machine = {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
               "flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags],
               "nice": os.nice(0), "load_average_start": os.getloadavg()[0]}
    runs = []
    for r in range(args.rounds):
        for name, options in CONFIGS.items():
            runs.append(measure(name, options, r))
            print(json.dumps(runs[-1]), flush=True)
    machine["load_average_end"] = os.getloadavg()[0]
    summary: dict[str, Any] = {}
    for name in CONFIGS:
        mine = [x for x in runs if x["config"] == name]
        summary[name] = {"decode_tok_s": max(x["decode_tok_s"] for x in mine),
                         "prefill_tok_s": max(x["prefill_tok_s"] for x in mine)}
    base = summary["tp1"]
    for name, s in summary.items():
        s["decode_vs_tp1"] = round(s["decode_tok_s"] / base["decode_tok_s"], 3)
        s["prefill_vs_tp1"] = round(s["prefill_tok_s"] / base["prefill_tok_s"], 3)
    result = {"benchmark": "tp_scaling", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "model": "smollm2-135m (Q4_1 GGUF, fp32 activations)", "machine": machine,
              "collectives_per_decode_step": 1 + 2 * 30 + 1, "decode_tokens": DECODE_TOKENS,
              "prefill_tokens": PREFILL_TOKENS, "summary_best_of_rounds": summary, "runs": runs}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
