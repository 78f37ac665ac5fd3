"""Quality of every quantization method on the default model: the README's quality table.

Reference = the default GGUF (Q4_1) dequantized to fp32; each method re-quantizes those weights
(calibration: Pride and Prejudice, 64 windows of 512 tokens) and is saved with `kiln quantize`'s
format to measure its size on disk. Evaluation: WikiText-2 test, llama.cpp perplexity chunking
(non-overlapping 512-token windows, second half of each scored), the first --chunks windows;
all models see the same windows in the same run. Per method: PPL, ΔPPL %, mean and p99 KL(ref‖q),
top-1 agreement and mean |Δp| of the true next token. Writes benchmarks/results/quant_quality.json.

Reference rows from llm-compressor (`--llmc-dir`, made by benchmarks/llmcompressor_reference.py on
the same calibration windows, from the same fp32 weights): its dequantized folder is evaluated as a
plain model, and its compressed-tensors folder as kiln loads it (INT4, native kernels). Foreign-format
rows: the sequential-GPTQ model saved by kiln, rewritten as GPTQ and AutoAWQ GEMM folders
(kiln.quantization.foreign.export) and loaded back: same weights in, same PPL out.

`--only SUBSTRING` (repeatable) runs only the rows whose label contains one of the substrings and
merges them into the existing result file (the other rows are kept from their own run; the reference
row is re-measured and must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from kiln.data import WIKITEXT2_TEST, data_path
from kiln.eval.forward import window_logits
from kiln.eval.kl_divergence import kl_from_logprobs
from kiln.eval.perplexity import llama_cpp_windows, ppl_from_nll, scored_logprobs
from kiln.hub import resolve_model
from kiln.loader.model_loader import load_model
from kiln.quantization.checkpoint import save_quantized
from kiln.quantization.foreign.export import export_folder, shard_rows_of
from kiln.quantization.quantize import QuantizeOptions, quantize_model

OUT = Path(__file__).parent / "results" / "quant_quality.json"
MODEL, CTX, THREADS = "smollm2-135m", 512, 2

SEQ_GPTQ_G128 = "GPTQ int4 g128, sequential (true-sequential, act-order, static groups, first token x64)"
CONFIGS: list[tuple[str, dict]] = [
    ("RTN int8 per-channel", dict(method="rtn", bits=8)),
    ("GPTQ int8 per-channel", dict(method="gptq", bits=8)),
    ("FP8 E4M3 per-channel", dict(method="fp8", bits=8)),
    ("SmoothQuant W8A8 (alpha 0.5)", dict(method="smoothquant", bits=8)),
    ("RTN int4 g32", dict(method="rtn", bits=4, group_size=32)),
    ("RTN int4 g128", dict(method="rtn", bits=4, group_size=128)),
    ("GPTQ int4 g128", dict(method="gptq", bits=4, group_size=128)),
    ("AWQ int4 g128", dict(method="awq", bits=4, group_size=128)),
    ("GPTQ int4 g128, sensitive layers int8 (--target-bits 5)", dict(method="gptq", bits=4, group_size=128, target_bits=5.0)),
    (SEQ_GPTQ_G128, dict(method="gptq", bits=4, group_size=128, sequential=True, first_token_weight=64.0)),
    ("AWQ int4 g128 + clip search", dict(method="awq", bits=4, group_size=128, clip=True)),
    ("RTN int4 g64", dict(method="rtn", bits=4, group_size=64)),
    ("GPTQ int4 g64, sequential", dict(method="gptq", bits=4, group_size=64, sequential=True, first_token_weight=64.0)),
    ("AWQ int4 g64 + clip search", dict(method="awq", bits=4, group_size=64, clip=True)),
]
# (label, folder under --llmc-dir): llm-compressor's results, loaded by kiln
LLMC_ROWS: list[tuple[str, str]] = [
    ("llm-compressor GPTQ W4A16 asym g64 (its defaults: static act-order, damping 0.01)", "llmc_gptq_g64/dequantized"),
    ("llm-compressor AWQ W4A16 asym g64 (its defaults)", "llmc_awq_g64/dequantized"),
    ("llm-compressor GPTQ g64: its compressed-tensors folder, loaded by kiln (INT4 native)", "llmc_gptq_g64/compressed"),
    ("llm-compressor AWQ g64: its compressed-tensors folder, loaded by kiln (INT4 native)", "llmc_awq_g64/compressed"),
]
# (label, format): the SEQ_GPTQ_G128 folder rewritten in a foreign format and loaded back
FOREIGN_ROWS: list[tuple[str, str]] = [
    ("GPTQ int4 g128 sequential, written as a GPTQ folder (gptq_v2) and loaded", "gptq"),
    ("GPTQ int4 g128 sequential, written as an AutoAWQ GEMM folder and loaded", "awq"),
]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=80, help="WikiText-2 windows to score (all: ~580)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--skip-mixed", action="store_true", help="leave out the --target-bits row (its sensitivity scan is slow)")
    parser.add_argument("--only", action="append", default=[], help="run only rows whose label contains this; merge")
    parser.add_argument("--out", type=Path, default=OUT, help="result file (default: the README's)")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--wait-llmc", type=float, default=0.0, help="seconds to wait for llm-compressor's folders")
    parser.add_argument("--llmc-dir", type=Path, help="folder with llmc_{gptq,awq}_g64/ from llmcompressor_reference.py")
    args = parser.parse_args()

    def wanted(label: str) -> bool:
        return not args.only or any(o in label for o in args.only)

    torch.set_num_threads(args.threads)
    path = resolve_model(MODEL)
    reference = load_model(path, dtype="float32", quantized_weights="dequantize")
    tok = reference.tokenizer

    models: dict[str, torch.nn.Module] = {}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec in CONFIGS:
            foreign_needed = label == SEQ_GPTQ_G128 and any(wanted(f) for f, _ in FOREIGN_ROWS)
            if (args.skip_mixed and "target_bits" in spec) or not (wanted(label) or foreign_needed):
                continue
            loaded = load_model(path, dtype="float32", quantized_weights="dequantize")
            start = time.perf_counter()
            report = quantize_model(loaded.model, tok, QuantizeOptions(calib_samples=args.calib_samples, progress=False, **spec))
            seconds = time.perf_counter() - start
            out = save_quantized(Path(tmp) / f"m{len(models)}", loaded.model, loaded.config, tok, report.quantization_config)
            loaded.model.finalize_quantized_layers()  # INT layouts: the native block layout, as `LLM(DIR)` runs them
            row = {"spec": spec, "size_bytes": folder_bytes(out), "quantize_seconds": round(seconds, 1),
                   "mean_bits": report.quantization_config["mean_bits"], "heldout_calibration_kl": round(report.kl_mean, 5)}
            print(f"{label}: quantized in {seconds:.0f} s, {row['size_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
            if foreign_needed:
                shards = shard_rows_of(loaded.model, report.quantization_config["layers"])
                for flabel, fmt in FOREIGN_ROWS:
                    if wanted(flabel):
                        fdir = export_folder(out, Path(tmp) / f"f{fmt}", fmt, loaded.model.packed_modules, shards, v1=False)
                        models[flabel] = load_model(fdir, dtype="float32").model
                        rows[flabel] = {"spec": {"format": fmt, "from": label}, "size_bytes": folder_bytes(fdir),
                                        "mean_bits": row["mean_bits"]}
            if wanted(label):
                models[label], rows[label] = loaded.model, row
        for label, sub in LLMC_ROWS:
            if not wanted(label):
                continue
            if args.llmc_dir is None:
                print(f"{label}: skipped (no --llmc-dir)", file=sys.stderr)
                continue
            folder = args.llmc_dir / sub
            deadline = time.time() + args.wait_llmc
            while not (folder.parent / "run.json").is_file() and time.time() < deadline:
                time.sleep(20)  # llm-compressor may still be running in its own environment
            run = json.loads((folder.parent / "run.json").read_text())
            models[label] = load_model(folder, dtype="float32").model
            rows[label] = {"spec": run, "size_bytes": folder_bytes(folder), "quantize_seconds": run["seconds"],
                           "mean_bits": float(run["bits"]),
                           "runtime": "dense fp32 (quantize-dequantized weights)" if sub.endswith("dequantized")
                           else "kiln INT4, native block kernel"}

    text = data_path(WIKITEXT2_TEST).read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=True)
    windows = llama_cpp_windows(ids, CTX, tok.bos_token_id if tok.add_bos_token else None, args.chunks)
    n_chunks = len(windows)
    nll = {name: [] for name in ["reference", *models]}
    kl = {name: [] for name in models}
    top1 = {name: [] for name in models}
    dp = {name: [] for name in models}
    for c, window in enumerate(windows):
        ref_lp, target = scored_logprobs(window_logits(reference.model, window), window)
        ref_true = ref_lp.gather(1, target[:, None]).squeeze(1)
        nll["reference"].append(-ref_true)
        for name, model in models.items():  # every model sees the same window, scored against one reference
            lp, _ = scored_logprobs(window_logits(model, window), window)
            true = lp.gather(1, target[:, None]).squeeze(1)
            nll[name].append(-true)
            kl[name].append(kl_from_logprobs(ref_lp, lp))
            top1[name].append((ref_lp.argmax(-1) == lp.argmax(-1)).float())
            dp[name].append((true.exp() - ref_true.exp()).abs())
        if (c + 1) % 10 == 0:
            print(f"{c + 1}/{n_chunks} windows", file=sys.stderr)

    ref = ppl_from_nll(torch.cat(nll["reference"]), n_chunks, CTX)
    results = [{"method": "reference: default GGUF Q4_1 dequantized to fp32", "size_bytes": path.stat().st_size,
                "size_note": "the GGUF file itself", "ppl": ref.ppl, "ppl_stderr": ref.stderr}]
    for name in models:
        p = ppl_from_nll(torch.cat(nll[name]), n_chunks, CTX)
        k = torch.cat(kl[name])
        results.append({"method": name, **rows[name], "ppl": p.ppl, "ppl_stderr": p.stderr,
                        "delta_ppl_pct": 100 * (p.ppl / ref.ppl - 1),
                        "kl_mean": k.mean().item(), "kl_p99": torch.quantile(k, 0.99).item(),
                        "top1_agreement": torch.cat(top1[name]).mean().item(), "mean_abs_dp": torch.cat(dp[name]).mean().item()})
        print(f"{name}: PPL {p.ppl:.3f} ({results[-1]['delta_ppl_pct']:+.2f} %), KL {k.mean().item():.4f}", file=sys.stderr)
    report = {"benchmark": "quant_quality", "model": MODEL, "ctx": CTX, "chunks": n_chunks, "tokens_scored": ref.n_tokens_scored,
              "eval_text": "wikitext-2-raw/wiki.test.raw", "calibration": f"Pride and Prejudice, {args.calib_samples} x 512 tokens",
              "runtime_note": "as loaded by LLM(DIR): INT4 g32/g128 and INT8 per-channel in the native block layout (prefill: "
                              "dequantize + GEMM), FP8 dequantize + GEMM, W8A8 torch._int_mm",
              "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}
    out_file: Path = args.out
    if args.only and out_file.is_file():  # merge: keep the rows this run did not measure
        old = json.loads(out_file.read_text())
        old_ref = old["results"][0]["ppl"]
        if abs(old_ref - ref.ppl) > 1e-6 * old_ref or old["chunks"] != n_chunks:
            raise SystemExit(f"reference PPL {ref.ppl} / {n_chunks} chunks differ from the saved run's; run every row")
        fresh = {r["method"]: r for r in results[1:]}
        merged = [r if r["method"] not in fresh else fresh.pop(r["method"]) for r in old["results"][1:]]
        report["results"] = [old["results"][0], *merged, *fresh.values()]
        report["date"] = f"{old['date']} (rows re-run {report['date']}: {', '.join(args.only)})"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
