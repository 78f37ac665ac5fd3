"""Speculative decoding, speculation on vs off in the same run, single stream and 8 requests at once.

(a) Code editing with the n-gram proposer: the first 8 HumanEval problems, each given in full
    (prompt + canonical solution) with the instruction to repeat the function with its name
    changed — text the output largely copies from the prompt, which prompt lookup exploits.
    GGUF blocks with `--quantized-weights native`, k=8.
(b) MT-Bench chat (first turn of the first 8 questions) with the target in bf16 (the default
    GGUF dequantized) and `self:int4` drafting (an INT4 g32 copy run by the block kernel), k=4.
Greedy, up to 256 new tokens, 2 threads. Batch 8 is above the default speculation switch-off
(4 running sequences), so it measures that the switch-off costs nothing. Outputs with and without
speculation are compared token for token. Writes benchmarks/results/spec_decode.json.
"""

import json
import sys
import time
from pathlib import Path

from kiln.bench.data import data_dir
from kiln.bench.kiln_runs import kiln_generate_timed
from kiln.bench.runner import run_isolated
from kiln.hub import resolve_model
from kiln.loader.tokenizer import Tokenizer

OUT = Path(__file__).parent / "results" / "spec_decode.json"
MODEL, NUM_PROMPTS, MAX_TOKENS, THREADS = "smollm2-135m", 8, 256, 2


def _chat(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


def code_edit_prompts(tok: Tokenizer) -> list[list[int]]:
    rows = [json.loads(line) for line in (data_dir() / "code" / "HumanEval.jsonl").read_text().splitlines()[:NUM_PROMPTS]]
    prompts = []
    for r in rows:
        code = r["prompt"] + r["canonical_solution"]
        ask = (f"Here is a Python function:\n\n```python\n{code}```\n\nRepeat this code exactly, but rename "
               f"`{r['entry_point']}` to `{r['entry_point']}_v2`. Output only the code.")
        prompts.append(_chat(tok, ask))
    return prompts


def mt_bench_prompts(tok: Tokenizer) -> list[list[int]]:
    rows = [json.loads(line) for line in (data_dir() / "prompts" / "mt_bench_question.jsonl").read_text().splitlines()]
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


def main() -> None:
    tok = Tokenizer.from_gguf(resolve_model(MODEL))
    only = sys.argv[1:] or list(WORKLOADS)
    report = {"benchmark": "spec_decode", "model": MODEL, "num_prompts": NUM_PROMPTS, "max_tokens": MAX_TOKENS,
              "threads": THREADS, "date": time.strftime("%Y-%m-%d %H:%M"), "workloads": {}}
    if OUT.exists():  # re-running one workload keeps the other's last figures
        report["workloads"] = json.loads(OUT.read_text()).get("workloads", {})
    for name in only:
        w = WORKLOADS[name]
        prompts = w["prompts"](tok)
        runs = {}
        for batch in (1, 8):
            off = run_isolated(kiln_generate_timed, MODEL, w["dtype"], prompts, MAX_TOKENS, w["base"], batch, threads=THREADS)
            on = run_isolated(kiln_generate_timed, MODEL, w["dtype"], prompts, MAX_TOKENS, {**w["base"], **w["spec"]}, batch,
                              threads=THREADS)
            for r in (off, on):
                if "error" in r:
                    raise SystemExit(f"{name} batch {batch}: {r['error']}")
            identical = off.pop("token_ids") == on.pop("token_ids")
            runs[f"batch_{batch}"] = {"speculation_off": off, "speculation_on": on,
                                      "speedup": on["output_tok_s"] / off["output_tok_s"], "outputs_identical": identical}
            print(f"{name} batch {batch}: off {off['output_tok_s']:.1f} tok/s, on {on['output_tok_s']:.1f} tok/s "
                  f"({on['output_tok_s'] / off['output_tok_s']:.2f}x), acceptance {on.get('spec_acceptance_rate')}, "
                  f"identical {identical}", file=sys.stderr)
        report["workloads"][name] = {"title": w["title"], "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
