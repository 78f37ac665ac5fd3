"""kiln's perplexity of the default GGUF vs llama.cpp's on the same file, same chunking, same run.

Both score WikiText-2 test with llama.cpp's perplexity-tool chunking (non-overlapping 512-token
windows, BOS replacement when the model adds BOS — SmolLM2 does not —, second half of each
window scored), each engine with its own tokenizer on the same text. kiln runs the GGUF
dequantized to fp32 (`kiln eval ppl`); llama.cpp runs it natively (Q4_1 blocks, llama-cpp-python
`logits_all=True`, the per-window NLL computed here from its logits exactly as `llama-perplexity`
does). Writes benchmarks/results/perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kiln.bench.data import data_dir
from kiln.eval.perplexity import llama_cpp_windows, perplexity, ppl_from_nll
from kiln.hub import resolve_model
from kiln.loader.model_loader import load_model

OUT = Path(__file__).parent / "results" / "perplexity.json"
MODEL, CTX, THREADS = "smollm2-135m", 512, 2


def llama_cpp_perplexity(path: Path, text: str, chunks: int) -> tuple[dict, int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, n_threads=THREADS, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # add_bos=True: "add the vocab's specials"
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    windows = llama_cpp_windows(ids, CTX, bos, chunks)
    nll = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[:CTX], dtype=np.float32))
        first = CTX // 2
        lp = torch.log_softmax(logits[first:-1], -1)
        nll.append(-lp.gather(1, torch.tensor(w[first + 1:])[:, None]).squeeze(1))
    r = ppl_from_nll(torch.cat(nll), len(windows), CTX)
    return {"ppl": r.ppl, "ppl_stderr": r.stderr, "chunks": r.n_chunks, "tokens_scored": r.n_tokens_scored}, len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=100, help="windows to score (all of WikiText-2 test: ~580)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    path = resolve_model(MODEL)
    text = (data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    loaded = load_model(path, dtype="float32", quantized_weights="dequantize")
    start = time.perf_counter()
    k = perplexity(loaded.model, loaded.tokenizer, text, CTX, args.chunks)
    kiln_s = time.perf_counter() - start
    start = time.perf_counter()
    llama, llama_tokens = llama_cpp_perplexity(path, text, args.chunks)
    llama_s = time.perf_counter() - start
    report = {
        "benchmark": "perplexity", "model": MODEL, "file": path.name, "ctx": CTX, "chunks": k.n_chunks,
        "text": "wikitext-2-raw/wiki.test.raw",
        "kiln": {"ppl": k.ppl, "ppl_stderr": k.stderr, "tokens_scored": k.n_tokens_scored, "seconds": kiln_s,
                 "text_tokens": len(loaded.tokenizer.encode(text, add_special_tokens=True)), "how": "kiln eval ppl (fp32, dequantized GGUF)"},
        "llama_cpp": {**llama, "seconds": llama_s, "text_tokens": llama_tokens,
                      "how": "llama-cpp-python (Q4_1 native, logits_all) + llama-perplexity's NLL over the same windows"},
        "ratio_kiln_over_llama_cpp": k.ppl / llama["ppl"],
        "threads": THREADS, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"kiln {k.ppl:.4f} vs llama.cpp {llama['ppl']:.4f}: ratio {k.ppl / llama['ppl']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
