"""K-quant quality rows: kiln's `kiln convert --type q4_k_m|q5_k_m|q6_k` against llama.cpp's `llama-quantize` of
the same F16 file, on the default model. Writes benchmarks/results/kquant_quality.json.

Source: kiln's F16 conversion of the default model (`kiln convert smollm2-135m --type f16`). The default
model is itself a Q4_1 GGUF, so this "full precision" is its Q4_1 weights dequantized (and rounded to
fp16): every row re-quantizes already-4-bit weights, as the quality table above does.

Rows: the F16 source (the reference), kiln's q4_k_m / q5_k_m / q6_k, and llama-quantize's Q4_K_M / Q5_K_M /
Q6_K of the same F16 file (when benchmarks/build_llama_cpp.py built it). Each file is loaded by kiln with
its weights dequantized to fp32 (the file's values exactly; no kernel rounding), and scored like
benchmarks/quant_quality.py: WikiText-2 test, llama.cpp's chunking (512-token windows, second half
scored), the first --chunks windows; PPL, ΔPPL, mean / p99 KL(F16 ‖ file), top-1 agreement, mean |Δp|,
file size and bits per weight of the 2-D tensors. Also: which tensor types each file holds, the share of
quantized blocks that are byte-identical between kiln's and llama.cpp's file of each type, the conversion
times, and `llama-perplexity`'s PPL of the F16 file and of both Q4_K_M files on the same windows.

    python benchmarks/kquant_quality.py [--chunks 80] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from build_llama_cpp import build_dir, build_flags, build_info, cpu_flags, existing  # noqa: E402

from kiln.data import WIKITEXT2_TEST, data_path  # noqa: E402
from kiln.eval.forward import window_logits  # noqa: E402
from kiln.eval.kl_divergence import kl_from_logprobs  # noqa: E402
from kiln.eval.perplexity import llama_cpp_windows, ppl_from_nll, scored_logprobs  # noqa: E402

OUT = Path(__file__).parent / "results" / "kquant_quality.json"
MODEL, CTX = "smollm2-135m", 512
KTYPES = ("q4_k_m", "q5_k_m", "q6_k")


def machine(threads: int) -> dict[str, Any]:
    from kiln.kernels.tune import cpu_identity

    cpu, flags = cpu_identity()
    return {"cpu": cpu, "flags": list(flags), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "load_average_start": list(os.getloadavg())}


def file_stats(path: Path) -> dict[str, Any]:
    """Size, tensor-type counts and bits per weight over the 2-D tensors of a GGUF file."""
    import gguf

    types: collections.Counter[str] = collections.Counter()
    weights = nbytes = 0
    for t in gguf.GGUFReader(path).tensors:
        types[t.tensor_type.name] += 1
        if len(t.shape) == 2:
            weights += int(t.n_elements)
            nbytes += int(t.n_bytes)
    return {"size_bytes": path.stat().st_size, "tensor_types": dict(sorted(types.items())),
            "mean_bits": 8 * nbytes / weights}


def same_blocks(a: Path, b: Path) -> dict[str, Any]:
    """Whether two GGUF files hold the same tensor types, and the share of identical quantized blocks."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    types_equal = ta.keys() == tb.keys() and all(ta[n].tensor_type == tb[n].tensor_type for n in ta)
    same = total = 0
    for name, t in ta.items():
        if not types_equal or t.tensor_type.name in ("F32", "F16"):
            continue
        size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        x, y = (np.asarray(v.data).view(np.uint8).reshape(-1, size) for v in (t, tb[name]))
        same += int((x == y).all(1).sum())
        total += len(x)
    return {"tensor_types_equal": types_equal, "identical_blocks": same, "blocks": total,
            "identical_share": same / total if total else None}


def llama_perplexity(tool: Path, model: Path, text: Path, chunks: int, threads: int) -> dict[str, Any]:
    """llama-perplexity's PPL over the first `chunks` 512-token windows (its own tokenizer and chunking)."""
    run = subprocess.run([str(tool), "-m", str(model), "-f", str(text), "-c", str(CTX), "--chunks", str(chunks),
                          "-t", str(threads), "-b", str(CTX)], capture_output=True, text=True, timeout=3600, check=False)
    if run.returncode != 0:
        raise SystemExit(f"llama-perplexity failed on {model.name}: {run.stderr[-2000:]}")
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", run.stdout + run.stderr)
    by_chunk = re.findall(r"\[(\d+)\]([0-9.]+)", run.stdout)
    if final:
        return {"ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)), "chunks": chunks}
    # its log line is sometimes cut off at exit here: the running estimate after the last chunk printed
    return {"ppl": float(by_chunk[-1][1]), "ppl_stderr": None, "chunks": int(by_chunk[-1][0]),
            "note": "running estimate after the last chunk printed (the Final estimate line was cut off)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=80, help="WikiText-2 windows to score (quant_quality.py: 80)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from kiln.convert.gguf_writer import convert_to_gguf
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model

    info = machine(args.threads)
    flags, _ = build_flags(cpu_flags())
    tools = existing(build_dir(flags), ("llama-quantize", "llama-perplexity"))
    if tools is None:
        print("llama-quantize / llama-perplexity not built (benchmarks/build_llama_cpp.py): kiln rows only",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        start = time.perf_counter()
        f16 = convert_to_gguf(load_model(resolve_model(MODEL), dtype="float32", quantized_weights="dequantize"),
                              tmp / "f16.gguf", "f16", progress=False)
        files: dict[str, Path] = {"F16 source (kiln convert --type f16 of the default Q4_1 GGUF)": f16}
        seconds = {"kiln f16": round(time.perf_counter() - start, 1)}
        source = load_model(f16, dtype="float32", quantized_weights="dequantize")
        for ftype in KTYPES:
            start = time.perf_counter()
            files[f"kiln {ftype}"] = convert_to_gguf(source, tmp / f"kiln_{ftype}.gguf", ftype, progress=False)
            seconds[f"kiln {ftype}"] = round(time.perf_counter() - start, 1)
            print(f"kiln {ftype}: {seconds[f'kiln {ftype}']} s", file=sys.stderr)
        del source
        if tools:
            for ftype in KTYPES:
                out = tmp / f"llama_{ftype}.gguf"
                start = time.perf_counter()
                subprocess.run([str(tools["llama-quantize"]), str(f16), str(out), ftype.upper(), str(args.threads)],
                               check=True, capture_output=True)
                seconds[f"llama-quantize {ftype.upper()}"] = round(time.perf_counter() - start, 1)
                files[f"llama-quantize {ftype.upper()}"] = out
        stats = {label: file_stats(path) for label, path in files.items()}
        agreement = {ftype: same_blocks(files[f"kiln {ftype}"], files[f"llama-quantize {ftype.upper()}"])
                     for ftype in KTYPES if tools}

        # kiln's scoring, every file on the same windows against the F16 source
        models = {label: load_model(path, dtype="float32", quantized_weights="dequantize") for label, path in files.items()}
        ref_label = next(iter(files))
        tok = models[ref_label].tokenizer
        text_path = data_path(WIKITEXT2_TEST)
        ids = tok.encode(text_path.read_text(encoding="utf-8"), add_special_tokens=True)
        windows = llama_cpp_windows(ids, CTX, tok.bos_token_id if tok.add_bos_token else None, args.chunks)
        nll: dict[str, list] = {label: [] for label in files}
        kl: dict[str, list] = {label: [] for label in files}
        top1: dict[str, list] = {label: [] for label in files}
        dp: dict[str, list] = {label: [] for label in files}
        for c, window in enumerate(windows):
            ref_lp, target = scored_logprobs(window_logits(models[ref_label].model, window), window)
            ref_true = ref_lp.gather(1, target[:, None]).squeeze(1)
            nll[ref_label].append(-ref_true)
            for label, loaded in models.items():
                if label == ref_label:
                    continue
                lp, _ = scored_logprobs(window_logits(loaded.model, window), window)
                true = lp.gather(1, target[:, None]).squeeze(1)
                nll[label].append(-true)
                kl[label].append(kl_from_logprobs(ref_lp, lp))
                top1[label].append((ref_lp.argmax(-1) == lp.argmax(-1)).float())
                dp[label].append((true.exp() - ref_true.exp()).abs())
            if (c + 1) % 10 == 0:
                print(f"{c + 1}/{len(windows)} windows", file=sys.stderr)
        del models
        ref = ppl_from_nll(torch.cat(nll[ref_label]), len(windows), CTX)
        results = []
        for label in files:
            p = ppl_from_nll(torch.cat(nll[label]), len(windows), CTX)
            row = {"method": label, **stats[label], "ppl": p.ppl, "ppl_stderr": p.stderr}
            if label != ref_label:
                k = torch.cat(kl[label])
                row.update(delta_ppl_pct=100 * (p.ppl / ref.ppl - 1), kl_mean=k.mean().item(),
                           kl_p99=torch.quantile(k, 0.99).item(), top1_agreement=torch.cat(top1[label]).mean().item(),
                           mean_abs_dp=torch.cat(dp[label]).mean().item())
            results.append(row)
            print(f"{label}: PPL {p.ppl:.3f}, {stats[label]['size_bytes'] / 2**20:.1f} MiB", file=sys.stderr)

        peer: dict[str, Any] = {}
        if tools:
            for label in (ref_label, "kiln q4_k_m", "llama-quantize Q4_K_M"):
                peer[label] = llama_perplexity(tools["llama-perplexity"], files[label], text_path, args.chunks,
                                               args.threads)
                print(f"llama-perplexity {label}: {peer[label]['ppl']:.4f}", file=sys.stderr)
    info["load_average_end"] = list(os.getloadavg())
    report = {"benchmark": "kquant_quality", "model": MODEL, "ctx": CTX, "chunks": len(windows),
              "tokens_scored": ref.n_tokens_scored, "eval_text": "wikitext-2-raw/wiki.test.raw",
              "source_note": "the F16 source is kiln's f16 conversion of the default Q4_1 GGUF: its Q4_1 weights "
                             "dequantized and rounded to fp16, so every row re-quantizes already-4-bit weights",
              "runtime_note": "kiln scores every file with its weights dequantized to fp32 at load (the file's values)",
              "conversion_seconds": seconds, "kiln_vs_llama_quantize": agreement,
              "llama_perplexity": peer, "llama_cpp_build": build_info(tools["llama-quantize"]) if tools else None,
              "command": "python benchmarks/kquant_quality.py " + " ".join(sys.argv[1:]),
              "machine": info, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
