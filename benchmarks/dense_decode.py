"""Dense-weight single-stream decode: kiln's dense decode kernel (kiln.kernels.dense_matmul) against torch's
GEMM inside kiln, and against Hugging Face transformers on the same weights, in one run.

The model: the default GGUF with every tensor dequantized (what a Hugging Face fp32 / bf16 folder gives
kiln), in fp32 and in bf16. Systems, each in a fresh process, alternating over ROUNDS rounds:
- kiln, dense kernel: the engine's default (the kernel up to the tuned row limit, the fused decode step,
  multi-step trips);
- kiln, torch GEMM: the same with KILN_QUANT_KERNELS=0 (kiln's own matmul kernels off: on this all-dense
  model that changes only the dense layers' and the tied head's GEMM);
- transformers: `generate` on the same GGUF (dequantized by transformers), greedy, the same dtype, its
  default attention (recorded; sdpa), `torch.inference_mode` — decode tok/s from a 128-token generation
  minus a 1-token one (kiln.bench.peers.transformers_decode_tok_s, as the latency benchmark times it).
Each run decodes 128 tokens (EOS ignored) after a chat prompt, 2 threads. kiln's figure is tok/s between
the first and the last token. Writes benchmarks/results/dense_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from single_stream_peers import machine  # noqa: E402

OUT = Path(__file__).parent / "results" / "dense_decode.json"
TOKENS = 128
PROMPT = "Write a short story about a robot who learns to paint, in five sentences."
SYSTEMS = {
    "kiln_kernel_float32": ("kiln", "float32", {}),
    "kiln_torch_float32": ("kiln", "float32", {"KILN_QUANT_KERNELS": "0"}),
    "transformers_float32": ("transformers", "float32", {}),
    "kiln_kernel_bfloat16": ("kiln", "bfloat16", {}),
    "kiln_torch_bfloat16": ("kiln", "bfloat16", {"KILN_QUANT_KERNELS": "0"}),
    "transformers_bfloat16": ("transformers", "bfloat16", {}),
}


def _prompt_ids() -> list[int]:
    from kiln.hub import pull
    from kiln.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(pull("smollm2-135m"))
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False)


def kiln_run(dtype: str, threads: int) -> dict[str, Any]:
    import torch

    from kiln.bench.kiln_runs import _engine, _stream_times, _warm_up
    from kiln.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    engine = _engine("smollm2-135m", dtype, {"quantized_weights": "dequantize", "threads": threads})
    prompt = _prompt_ids()
    _warm_up(engine, prompt)
    times = _stream_times(engine, prompt, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True))
    return {"tok_s": (len(times) - 1) / (times[-1] - times[0]), "decode_path": engine.loaded.model.decode_plan_status}


def transformers_run(dtype: str, threads: int) -> dict[str, Any]:
    import torch

    from kiln.bench.peers import load_transformers, transformers_decode_tok_s
    from kiln.hub import pull

    torch.set_num_threads(threads)
    model = load_transformers(pull("smollm2-135m"), dtype)
    prompt = _prompt_ids()
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False)  # warm-up
    return {"tok_s": transformers_decode_tok_s(model, prompt, TOKENS),
            "attn_implementation": model.config._attn_implementation}


def child(system: str, threads: int) -> None:
    kind, dtype, _ = SYSTEMS[system]
    result = kiln_run(dtype, threads) if kind == "kiln" else transformers_run(dtype, threads)
    print(json.dumps(result))


def run_child(system: str, threads: int) -> dict[str, Any]:
    env = dict(os.environ, **SYSTEMS[system][2])
    out = subprocess.run([sys.executable, __file__, "--child", system, "--threads", str(threads)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=sorted(SYSTEMS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads)
        return
    import torch

    from kiln.kernels.dense_matmul import dense_kernel_rows
    from kiln.planner.calibration import read_bandwidth_gb_s

    torch.set_num_threads(args.threads)  # the bandwidth probe's threads, as every system's
    result: dict[str, Any] = {"benchmark": "dense_decode", "model": "smollm2-135m, every tensor dequantized",
                              "tokens": TOKENS, "machine": machine(read_bandwidth_gb_s()),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {},
                              "dense_kernel_rows": {d: dense_kernel_rows(getattr(torch, d)) for d in ("float32", "bfloat16")}}
    for r in range(args.rounds):
        for system in SYSTEMS:
            run = run_child(system, args.threads)
            result["runs"].setdefault(system, []).append(run)
            print(f"round {r + 1} {system}: {run['tok_s']:.1f} tok/s", file=sys.stderr)
    result["median_tok_s"] = {s: statistics.median(x["tok_s"] for x in runs) for s, runs in result["runs"].items()}
    result["per_round"] = {}
    for dtype in ("float32", "bfloat16"):
        kernel = [x["tok_s"] for x in result["runs"][f"kiln_kernel_{dtype}"]]
        for other in (f"kiln_torch_{dtype}", f"transformers_{dtype}"):
            result["per_round"][f"kiln_kernel_{dtype}_vs_{other}"] = [
                a / b["tok_s"] for a, b in zip(kernel, result["runs"][other])]
    result["machine"].update(read_bandwidth_gb_s_end=read_bandwidth_gb_s(), load_average_end=os.getloadavg()[0])
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, ratios in result["per_round"].items():
        print(f"{name}: median {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
