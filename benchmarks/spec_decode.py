"""Speculative decoding, speculation on vs off in the same run, single stream and 8 requests at once.

(a) Code editing with the n-gram proposer: the first 8 HumanEval problems, each given in full
    (prompt + canonical solution) with the instruction to repeat the function with its name
    changed — text the output largely copies from the prompt, which prompt lookup exploits.
    GGUF blocks with `--quantized-weights native`, k=8.
(b) MT-Bench chat (first turn of the first 8 questions) with the target in bf16 (the default
    GGUF dequantized) and `self:int4` drafting (an INT4 g32 copy run by the block kernel), k=4.
Greedy, up to 256 new tokens, 2 threads. Outputs with and without speculation are compared token
for token. Per workload: speculation off vs on at 1 and 8 requests at once (8 is above the default
switch-off, so that row measures that the switch-off costs nothing), and a sweep at 1, 2, 4 and 8
requests with both switch-offs disabled (the batch-size threshold and the adaptive controller that
stops speculating where it measures no gain) — where speculation stops paying, which sets the
default of `--speculative-disable-by-batch-size`. Writes benchmarks/results/spec_decode.json.
Usage: python benchmarks/spec_decode.py [WORKLOAD ...] [--no-sweep]
"""

import json
import sys
import time
from pathlib import Path

from kiln.data import HUMANEVAL, MT_BENCH, data_path
from kiln.bench.kiln_runs import kiln_generate_timed
from kiln.bench.runner import run_isolated
from kiln.hub import resolve_model
from kiln.loader.tokenizer import Tokenizer

OUT = Path(__file__).parent / "results" / "spec_decode.json"
MODEL, NUM_PROMPTS, MAX_TOKENS, THREADS = "smollm2-135m", 8, 256, 2


def _chat(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def code_edit_prompts(tok: Tokenizer) -> list[list[int]]:
    rows = [json.loads(line) for line in data_path(HUMANEVAL).read_text(encoding="utf-8").splitlines()[:NUM_PROMPTS]]
    prompts = []
    for r in rows:
        code = r["prompt"] + r["canonical_solution"]
        ask = (f"Here is a Python function:\n\n```python\n{code}```\n\nRepeat this code exactly, but rename "
               f"`{r['entry_point']}` to `{r['entry_point']}_v2`. Output only the code.")
        prompts.append(_chat(tok, ask))
    return prompts


def mt_bench_prompts(tok: Tokenizer) -> list[list[int]]:
    rows = [json.loads(line) for line in data_path(MT_BENCH).read_text(encoding="utf-8").splitlines()]
    return [_chat(tok, r["turns"][0]) for r in rows[:NUM_PROMPTS]]


WORKLOADS = {
    # 'native': every matmul with M <= 16 tokens runs the block kernel, whose rows are computed
    # independently (batch-invariant), so decode (M=1) and verification (M=1+k) share numerics.
    "code_edit_ngram": dict(
        title="HumanEval code editing (rename and repeat), n-gram k=8, Q4_1 blocks",
        prompts=code_edit_prompts, dtype="auto",
        base={"kv_cache_memory": 512 << 20, "quantized_weights": "native"},
        spec={"speculative_model": "ngram", "num_speculative_tokens": 8, "ngram_min": 2, "ngram_max": 4}),
    "chat_self_int4": dict(
        title="MT-Bench chat, bf16 target, self:int4 draft k=4",
        prompts=mt_bench_prompts, dtype="bfloat16",
        base={"kv_cache_memory": 512 << 20, "quantized_weights": "dequantize"},
        spec={"speculative_model": "self:int4", "num_speculative_tokens": 4}),
}


SWEEP_BATCHES = (2, 4)  # plus 1 and 8, whose speculation-off runs the main runs already made
ALWAYS_ON = {"speculative_disable_by_batch_size": 64, "speculative_adaptive": False}


def _timed(name: str, w: dict, prompts: list[list[int]], kwargs: dict, batch: int) -> dict:
    r = run_isolated(kiln_generate_timed, MODEL, w["dtype"], prompts, MAX_TOKENS, kwargs, batch, threads=THREADS)
    if "error" in r:
        raise SystemExit(f"{name} batch {batch}: {r['error']}")
    return r


def _compare(off: dict, on: dict) -> dict:
    identical = off.pop("token_ids") == on.pop("token_ids")
    out = {"speculation_off": off, "speculation_on": on, "speedup": on["output_tok_s"] / off["output_tok_s"],
           "outputs_identical": identical}
    if "decode_tok_s" in off and "decode_tok_s" in on:  # the same, prefill (TTFT) excluded
        out["decode_speedup"] = on["decode_tok_s"] / off["decode_tok_s"]
    return out


def main() -> None:
    tok = Tokenizer.from_gguf(resolve_model(MODEL))
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sweep = "--no-sweep" not in sys.argv
    only = args or list(WORKLOADS)
    report = {"benchmark": "spec_decode", "model": MODEL, "num_prompts": NUM_PROMPTS, "max_tokens": MAX_TOKENS,
              "threads": THREADS, "date": time.strftime("%Y-%m-%d %H:%M"), "workloads": {}}
    if OUT.exists():  # re-running one workload keeps the other's last figures
        report["workloads"] = json.loads(OUT.read_text()).get("workloads", {})
    for name in only:
        w = WORKLOADS[name]
        prompts = w["prompts"](tok)
        runs, offs = {}, {}
        for batch in (1, 8):
            offs[batch] = _timed(name, w, prompts, w["base"], batch)
            on = _timed(name, w, prompts, {**w["base"], **w["spec"]}, batch)
            runs[f"batch_{batch}"] = _compare(dict(offs[batch]), on)
            print(f"{name} batch {batch}: off {offs[batch]['output_tok_s']:.1f} tok/s, on {on['output_tok_s']:.1f} tok/s "
                  f"({runs[f'batch_{batch}']['speedup']:.2f}x; decode only {runs[f'batch_{batch}'].get('decode_speedup', 0):.2f}x), "
                  f"acceptance {on.get('spec_acceptance_rate')}, "
                  f"identical {runs[f'batch_{batch}']['outputs_identical']}", file=sys.stderr)
        entry = {"title": w["title"], "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}
        if sweep:  # speedup with the switch-off disabled, per batch size
            curve = {}
            for batch in (1, *SWEEP_BATCHES, 8):
                off = offs[batch] if batch in offs else _timed(name, w, prompts, w["base"], batch)
                forced = _timed(name, w, prompts, {**w["base"], **w["spec"], **ALWAYS_ON}, batch)
                curve[str(batch)] = _compare(dict(off), forced)["speedup"]
                print(f"{name} batch {batch}, switch-off disabled: {curve[str(batch)]:.2f}x", file=sys.stderr)
            entry["always_on_speedup_by_batch"] = curve
            entry["always_on_batch_1_measured"] = True
        report["workloads"][name] = entry
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
