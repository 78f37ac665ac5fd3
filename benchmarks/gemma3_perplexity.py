"""Gemma 3 270M (Q4_K_M GGUF) perplexity: `kiln eval ppl` against llama.cpp's C++ `llama-perplexity`,
same file, same text, same windows (issue 19).

- kiln: kiln.eval.perplexity as `kiln eval ppl gemma3-270m --ctx 512 --chunks 100` runs it (the GGUF
  dequantized to fp32, the reference path; `--quantized-weights auto` adds a row on the native kernels);
- llama.cpp: `llama-perplexity -m FILE -f wiki.test.raw -c 512 --chunks 100 -b 512 -t THREADS`, its own
  tokenizer and kernels; its "Final estimate: PPL = X +/- Y" line is the figure.
Both use llama-perplexity's chunking (text tokenized once, BOS first in each window when the vocabulary
adds it — Gemma's does —, the second half of each window scored), on WikiText-2 test shipped in kiln/data.
Writes benchmarks/results/gemma3_perplexity.json.
Usage: python benchmarks/gemma3_perplexity.py --llama-perplexity PATH [--chunks 100] [--ctx 512]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from kiln.entrypoints.cli_eval import read_text
from kiln.eval.perplexity import perplexity
from kiln.hub import resolve_model
from kiln.loader.model_loader import load_model

OUT = Path(__file__).parent / "results" / "gemma3_perplexity.json"
TEXT = Path(__file__).resolve().parents[1] / "kiln" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def kiln_ppl(path: Path, text: str, ctx: int, chunks: int, quantized_weights: str) -> dict[str, Any]:
    loaded = load_model(path, dtype="float32", quantized_weights=quantized_weights)
    start = time.perf_counter()
    r = perplexity(loaded.model, loaded.tokenizer, text, ctx, chunks, progress=True)
    return {"ppl": r.ppl, "ppl_stderr": r.stderr, "chunks": r.n_chunks, "tokens_scored": r.n_tokens_scored,
            "seconds": time.perf_counter() - start, "quantized_weights": quantized_weights}


def llama_perplexity(binary: Path, path: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> dict[str, Any]:
    start = time.perf_counter()
    out = subprocess.run([str(binary), "-m", str(path), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
                          "--chunks", str(chunks), "-t", str(threads)], capture_output=True, text=True)
    log = out.stdout + out.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"llama-perplexity failed (rc {out.returncode}):\n{log[-3000:]}")
    n_chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)),
            "chunks": int(n_chunks.group(1)) if n_chunks else None, "seconds": time.perf_counter() - start,
            "binary": str(binary)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-perplexity", type=Path, required=True)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    text = read_text(None)
    result: dict[str, Any] = {
        "model": path.name, "ctx": args.ctx, "chunks": args.chunks, "text": "kiln/data/wikitext-2-raw/wiki.test.raw",
        "threads": args.threads, "cpu": next((line.split(":", 1)[1].strip() for line in
                                              Path("/proc/cpuinfo").read_text().splitlines()
                                              if line.startswith("model name")), ""),
        "load_average_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["kiln_fp32"] = kiln_ppl(path, text, args.ctx, args.chunks, "dequantize")
    print("kiln (dequantized fp32)", result["kiln_fp32"])
    result["kiln_native"] = kiln_ppl(path, text, args.ctx, args.chunks, "auto")
    print("kiln (native kernels)", result["kiln_native"])
    result["llama_perplexity"] = llama_perplexity(args.llama_perplexity, path, TEXT, args.ctx, args.chunks, args.threads)
    print("llama-perplexity", result["llama_perplexity"])
    ref = result["llama_perplexity"]["ppl"]
    result["ratio_kiln_fp32_over_llama"] = result["kiln_fp32"]["ppl"] / ref
    result["ratio_kiln_native_over_llama"] = result["kiln_native"]["ppl"] / ref
    result["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}))


if __name__ == "__main__":
    main()
