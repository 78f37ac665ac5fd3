"""kiln's perplexity of the default GGUF against llama.cpp's, same file, same text, same chunking.

Both engines score WikiText-2 test (kiln/data/wikitext-2-raw/wiki.test.raw) with the
chunking of llama.cpp's `llama-perplexity`: the whole text tokenized once (BOS iff the vocabulary
adds it; SmolLM2's does not), non-overlapping windows of --ctx tokens, each window's first token
replaced by BOS when BOS is added, and only the second half of each window scored.

* kiln: `kiln.eval.perplexity.perplexity` on the GGUF dequantized to fp32 (the reference path).
* llama.cpp: llama-cpp-python running the same GGUF natively (its Q4_1 kernels), its own
  tokenizer, one `eval` per window with `logits_all=True`; the NLL of the scored half is taken
  from its logits here exactly as perplexity.cpp does, and PPL ± error aggregated the same way.

Writes benchmarks/results/perplexity.json (read by benchmarks/report.py for the README).
Usage: python benchmarks/perplexity.py [--chunks N] [--ctx 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.entrypoints.cli_eval import read_text
from kiln.eval.perplexity import (
    PerplexityResult, llama_cpp_windows, perplexity, ppl_from_nll, progress_iter, scored_targets, token_nll,
)
from kiln.hub import resolve_model
from kiln.loader.model_loader import load_model

OUT = Path(__file__).parent / "results" / "perplexity.json"
MODEL = "smollm2-135m"


def llama_cpp_perplexity(path: Path, text: str, ctx: int, chunks: int | None, threads: int) -> tuple[PerplexityResult, list[int]]:
    """llama.cpp's PPL of `path` on `text` (its tokenizer, its kernels) and the tokens it produced."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    # add_bos=True means "add the specials the vocabulary asks for" (common_tokenize(..., add_special=true)).
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    windows = llama_cpp_windows(ids, ctx, bos, chunks)
    nll = []
    for w in progress_iter(windows, "llama.cpp", True):
        llm.reset()  # n_past = 0: the next eval overwrites the KV cache from position 0
        llm.eval(w)
        logits = torch.from_numpy(np.asarray(llm.scores[:ctx], dtype=np.float32))
        nll.append(token_nll(logits[ctx // 2:ctx - 1], scored_targets(w)))
    return ppl_from_nll(torch.cat(nll), len(windows), ctx), ids


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two tokenizations differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def engine_entry(r: PerplexityResult, seconds: float, text_tokens: int, how: str) -> dict[str, Any]:
    return {"ppl": r.ppl, "ppl_stderr": r.stderr, "nll_mean": r.nll_mean, "tokens_scored": r.n_tokens_scored,
            "text_tokens": text_tokens, "seconds": seconds, "how": how}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=None, help="score only the first N windows (default: all)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(MODEL)
    text = read_text(None)

    loaded = load_model(path, dtype="float32", quantized_weights="dequantize")
    kiln_ids = loaded.tokenizer.encode(text, add_special_tokens=True)
    start = time.perf_counter()
    k = perplexity(loaded.model, loaded.tokenizer, text, args.ctx, args.chunks, progress=True)
    kiln_s = time.perf_counter() - start
    del loaded  # free the fp32 copy before llama.cpp maps its own

    start = time.perf_counter()
    lc, llama_ids = llama_cpp_perplexity(path, text, args.ctx, args.chunks, args.threads)
    llama_s = time.perf_counter() - start

    import llama_cpp

    report = {
        "benchmark": "perplexity", "model": MODEL, "file": path.name, "ctx": args.ctx, "chunks": k.n_chunks,
        "chunks_available": len(kiln_ids) // args.ctx, "all_chunks": args.chunks is None,
        "text": "kiln/data/wikitext-2-raw/wiki.test.raw",
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "chunking": "llama-perplexity: text tokenized once, BOS iff the vocab adds it (SmolLM2: no), "
                    "non-overlapping ctx windows, first token replaced by BOS when added, logits [ctx/2, ctx-1) scored",
        "kiln": engine_entry(k, kiln_s, len(kiln_ids), "kiln.eval.perplexity, GGUF dequantized to fp32"),
        "llama_cpp": engine_entry(lc, llama_s, len(llama_ids),
                                  f"llama-cpp-python {llama_cpp.__version__} running the GGUF natively (Q4_1), "
                                  "its own tokenizer, one eval per window with logits_all=True, NLL of the scored "
                                  "half from its logits as perplexity.cpp computes it"),
        "tokens_identical": kiln_ids == llama_ids, "first_token_difference": first_difference(kiln_ids, llama_ids),
        "ratio_kiln_over_llama_cpp": k.ppl / lc.ppl,
        "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"kiln {k.describe()}\nllama.cpp {lc.describe()}\nratio kiln/llama.cpp = {k.ppl / lc.ppl:.5f}", file=sys.stderr)


if __name__ == "__main__":
    main()
