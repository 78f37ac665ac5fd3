"""Gemma 3 270M (Q4_K_M GGUF) single-stream decode: kiln with its native block kernels vs kiln on
dequantized weights vs llama.cpp's C++ `llama-bench` tg128, same file, same threads, one run.

- kiln native: `quantized_weights="auto"` — Q8_0 kept in blocks, Q5_0 repacked to Q8_0 and Q4_K to
  Q4_1 (kiln.layers.gguf_repack), Q6_K layers on the K-quant super-block kernel as stored
  (kiln.layers.kquant_linear); the tied Q8_0 embedding doubles as a native LM head; activations in the
  auto dtype (fp32 on a CPU without AMX).
- kiln dequantized: every tensor expanded at load, bf16 and fp32 activations.
- llama.cpp: `llama-bench -m FILE -p 0 -n 128 -t THREADS -r 3 -o json` (tg128: 128 tokens after an
  empty prompt), built from the sources vendored in the llama-cpp-python sdist (pass `--llama-bench`).
kiln decodes 128 tokens (EOS ignored) after a short chat prompt; tok/s between the first and the
last token. Each kiln configuration runs in a fresh process; the systems alternate over ROUNDS
rounds (this machine's speed drifts) and each figure is the median of its rounds.
Writes benchmarks/results/gemma3_decode.json; `--model FILE --out RESULT` runs the same comparison on
another GGUF (the K-quant re-quantization of the default model: benchmarks/results/kquant_decode_smollm2.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results" / "gemma3_decode.json"
TOKENS = 128
CONFIGS = {
    "kiln_native": {"quantized_weights": "auto", "dtype": "auto"},
    "kiln_dequantized_bf16": {"quantized_weights": "dequantize", "dtype": "bfloat16"},
    "kiln_dequantized_fp32": {"quantized_weights": "dequantize", "dtype": "float32"},
}


def machine(threads: int) -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"cpu": model or platform.processor(), "flags": [f for f in wanted if f in flags],
            "cores": os.cpu_count(), "threads": threads, "load_average_start": os.getloadavg()}


def kiln_run(config: str, threads: int, model: str) -> None:
    """Child process: one kiln configuration, prints a JSON line."""
    import torch

    from kiln import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(model, threads=threads, enable_prefix_caching=False, kv_cache_memory="256MiB",
              **CONFIGS[config])
    tok = llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot "
                                                  "who learns to paint, in five sentences."}]), add_special_tokens=False)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    times = [time.perf_counter() for _ in llm.generate_stream(
        {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True))]
    paths: dict[str, int] = {}
    for m in llm.engine.loaded.model.modules():
        if hasattr(m, "method"):
            paths[m.method.name] = paths.get(m.method.name, 0) + 1
    print(json.dumps({"tok_s": (len(times) - 1) / (times[-1] - times[0]), "dtype": str(llm.engine.loaded.model.dtype),
                      "linear_paths": paths, "decode_path": llm.engine.loaded.model.decode_plan_status}))


def kiln_process(config: str, threads: int, model: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", config, "--threads", str(threads), "--model", model],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_bench(binary: Path, gguf: Path, threads: int) -> dict[str, Any]:
    out = subprocess.run([str(binary), "-m", str(gguf), "-p", "0", "-n", str(TOKENS), "-t", str(threads), "-r", "3",
                          "-o", "json"], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)[0]
    return {"tok_s": row["avg_ts"], "stddev": row["stddev_ts"], "build": row.get("build_commit"),
            "cpu_info": row.get("cpu_info")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-bench", type=Path, required=False, help="path to llama.cpp's llama-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--model", default="gemma3-270m", help="registered name or .gguf file")
    args = parser.parse_args()
    if args.child:
        kiln_run(args.child, args.threads, args.model)
        return
    from kiln.hub import resolve_model

    gguf = resolve_model(args.model)
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(gguf, "r").tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    result: dict[str, Any] = {"model": gguf.name, "tensor_types": counts, "tokens": TOKENS, "machine": machine(args.threads),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}
    systems = [*CONFIGS] + (["llama_bench_tg128"] if args.llama_bench else [])
    for _ in range(args.rounds):
        for name in systems:
            run = llama_bench(args.llama_bench, gguf, args.threads) if name == "llama_bench_tg128" \
                else kiln_process(name, args.threads, str(gguf))
            result["runs"].setdefault(name, []).append(run)
            print(name, f"{run['tok_s']:.1f} tok/s", file=sys.stderr)
    result["median_tok_s"] = {k: statistics.median(r["tok_s"] for r in v) for k, v in result["runs"].items()}
    med = result["median_tok_s"]
    result["ratios"] = {"native_vs_dequantized_bf16": med["kiln_native"] / med["kiln_dequantized_bf16"],
                        "native_vs_dequantized_fp32": med["kiln_native"] / med["kiln_dequantized_fp32"]}
    if "llama_bench_tg128" in med:
        result["ratios"]["native_vs_llama_bench"] = med["kiln_native"] / med["llama_bench_tg128"]
        pairs = [k["tok_s"] / b["tok_s"] for k, b in zip(result["runs"]["kiln_native"], result["runs"]["llama_bench_tg128"])]
        result["per_round_native_vs_llama_bench"] = pairs
    bf16 = [k["tok_s"] / b["tok_s"] for k, b in zip(result["runs"]["kiln_native"], result["runs"]["kiln_dequantized_bf16"])]
    result["per_round_native_vs_dequantized_bf16"] = bf16
    result["machine"]["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_tok_s"]), json.dumps(result["ratios"]))


if __name__ == "__main__":
    main()
