"""Decode speed of foreign W4A16 checkpoints against the same weights in kiln's own INT4 folder, one run.

The default model (its GGUF dequantized to fp32) is quantized once with RTN int4 g64 and saved as a kiln
folder; that folder is rewritten as a GPTQ (gptq_v2), an AutoAWQ GEMM and a compressed-tensors
pack-quantized folder (kiln.quantization.foreign.export). Each folder is loaded as a user would
(`kiln serve DIR`, `LLM(DIR)`): the foreign ones are repacked at load into kiln's INT layout. Then, in
alternating rounds, each system runs in a fresh process: single-stream decode of 128 tokens after a chat
prompt, and a 1,024-token prefill (2 threads, greedy). Ratios are per round against kiln's own folder.

Writes benchmarks/results/foreign_decode.json. The folders live in $KILN_HOME/bench/foreign_decode (made
once). On a CPU shared with other work, run it as `chrt -f 20 python benchmarks/foreign_decode.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "foreign_decode.json"
MODEL, THREADS, ROUNDS = "smollm2-135m", 2, 3
FORMATS = ("gptq", "awq", "compressed-tensors")


def make_folders(root: Path) -> dict[str, Path]:
    """kiln's RTN int4 g64 folder of the default model and its three foreign rewrites (made once)."""
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model
    from kiln.quantization.checkpoint import save_quantized
    from kiln.quantization.foreign.export import export_folder, shard_rows_of
    from kiln.quantization.quantize import QuantizeOptions, quantize_model

    folders = {"kiln": root / "kiln", **{fmt: root / fmt for fmt in FORMATS}}
    if all((f / "config.json").is_file() for f in folders.values()):
        return folders
    loaded = load_model(resolve_model(MODEL), dtype="float32", quantized_weights="dequantize")
    report = quantize_model(loaded.model, loaded.tokenizer, QuantizeOptions(method="rtn", bits=4, group_size=64,
                                                                            progress=False))
    save_quantized(folders["kiln"], loaded.model, loaded.config, loaded.tokenizer, report.quantization_config)
    shards = shard_rows_of(loaded.model, report.quantization_config["layers"])
    for fmt in FORMATS:
        export_folder(folders["kiln"], folders[fmt], fmt, loaded.model.packed_modules, shards, v1=False)
    return folders


def _prompts() -> tuple[list[int], list[int]]:
    from kiln.data import WIKITEXT2_TEST, data_path
    from kiln.hub import resolve_model
    from kiln.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(resolve_model(MODEL))
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me about the history of printing."}],
                                              add_generation_prompt=True), add_special_tokens=False)
    long = tok.encode(data_path(WIKITEXT2_TEST).read_text()[:20000])[:1024]
    return chat, long


def main() -> None:
    from kiln.bench.kiln_runs import kiln_latency
    from kiln.bench.runner import run_isolated
    from kiln.hub import kiln_home
    from kiln.planner.calibration import cpu_name

    t0 = time.time()
    folders = make_folders(kiln_home() / "bench" / "foreign_decode")
    chat, long = _prompts()
    runs: dict[str, list[dict]] = {name: [] for name in folders}
    load_start = os.getloadavg()[0]
    for r in range(ROUNDS):
        order = list(folders) if r % 2 == 0 else list(reversed(folders))  # alternate who goes first
        for name in order:
            res = run_isolated(kiln_latency, str(folders[name]), "float32", chat, long, 128, {"threads": THREADS},
                               threads=THREADS)
            if "error" in res:
                raise SystemExit(f"{name}: {res['error']}")
            runs[name].append(res)
            print(f"round {r + 1} {name}: decode {res['decode_tok_s']:.1f} tok/s, prefill {res['prefill_tok_s']:.0f}",
                  file=sys.stderr)
    rows = []
    for name, rs in runs.items():
        ratios = [x["decode_tok_s"] / k["decode_tok_s"] for x, k in zip(rs, runs["kiln"])]
        rows.append({"folder": name, "system": rs[0]["system"],
                     "decode_tok_s": [x["decode_tok_s"] for x in rs], "prefill_tok_s": [x["prefill_tok_s"] for x in rs],
                     "decode_tok_s_median": statistics.median(x["decode_tok_s"] for x in rs),
                     "prefill_tok_s_median": statistics.median(x["prefill_tok_s"] for x in rs),
                     "decode_ratio_vs_kiln_per_round": ratios, "decode_ratio_vs_kiln_median": statistics.median(ratios),
                     "peak_rss_mib": max(x["peak_rss_mib"] for x in rs)})
    result = {"benchmark": "foreign_decode", "model": MODEL, "weights": "RTN int4 g64 (one set of weights, four folders)",
              "threads": THREADS, "rounds": ROUNDS, "output_len": 128, "prefill_len": len(long),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}",
              "scheduling": "SCHED_FIFO" if os.sched_getscheduler(0) == os.SCHED_FIFO else "normal",
              "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
              "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.time() - t0, "rows": rows}
    OUT.write_text(json.dumps(result, indent=1))
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
