"""n-gram speculative decoding on code editing: speculation on vs off, same run.

Workload (a) of the speculative-decoding issue: the first 8 HumanEval problems, each given in
full (prompt + canonical solution) with the instruction to repeat the function with its name
changed — text the output largely copies from the prompt, which is what prompt lookup exploits.
Greedy, up to 256 new tokens, 2 threads, GGUF blocks with `--quantized-weights native`. Single stream (one request at a time)
and batch 8 (above the default speculation switch-off of 4 running sequences, so it measures
that the switch-off costs nothing). Outputs with and without speculation are compared token
for token. Writes benchmarks/results/spec_decode.json.
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


def code_edit_prompts(tok: Tokenizer) -> list[list[int]]:
    rows = [json.loads(line) for line in (data_dir() / "code" / "HumanEval.jsonl").read_text().splitlines()[:NUM_PROMPTS]]
    prompts = []
    for r in rows:
        code = r["prompt"] + r["canonical_solution"]
        ask = (f"Here is a Python function:\n\n```python\n{code}```\n\nRepeat this code exactly, but rename "
               f"`{r['entry_point']}` to `{r['entry_point']}_v2`. Output only the code.")
        prompts.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": ask}]), add_special_tokens=False))
    return prompts


def main() -> None:
    tok = Tokenizer.from_gguf(resolve_model(MODEL))
    prompts = code_edit_prompts(tok)
    # 'native': every matmul with M <= 16 tokens runs the block kernel, whose rows are computed
    # independently (batch-invariant), so decode (M=1) and verification (M=1+k) share numerics.
    # In 'auto' the M>4 path is a bf16 copy of the Q4 weights, which rounds differently.
    base = {"kv_cache_memory": 512 << 20, "quantized_weights": "native"}
    spec = {**base, "speculative_model": "ngram", "num_speculative_tokens": 8, "ngram_min": 2, "ngram_max": 4}
    runs = {}
    for batch in (1, 8):
        off = run_isolated(kiln_generate_timed, MODEL, "auto", prompts, MAX_TOKENS, base, batch, threads=THREADS)
        on = run_isolated(kiln_generate_timed, MODEL, "auto", prompts, MAX_TOKENS, spec, batch, threads=THREADS)
        identical = off.pop("token_ids") == on.pop("token_ids")
        runs[f"batch_{batch}"] = {"speculation_off": off, "ngram_k8": on, "speedup": on["output_tok_s"] / off["output_tok_s"],
                                  "outputs_identical": identical}
        print(f"batch {batch}: off {off['output_tok_s']:.1f} tok/s, ngram {on['output_tok_s']:.1f} tok/s "
              f"({on['output_tok_s'] / off['output_tok_s']:.2f}x), acceptance {on.get('spec_acceptance_rate')}, "
              f"identical {identical}", file=sys.stderr)
    report = {"benchmark": "spec_decode", "workload": "HumanEval code editing (rename and repeat), greedy",
              "model": MODEL, "num_prompts": NUM_PROMPTS, "max_tokens": MAX_TOKENS, "threads": THREADS,
              "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
