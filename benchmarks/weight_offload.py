"""The default model under a weight budget of a third of its file (`--max-weight-memory`, issue 19):
single-stream decode with the page cache warm and cold, against the same model fully resident.

Configurations (each a fresh process, alternating over ROUNDS rounds; each figure a median):
- resident_auto: kiln's default (Q4_1 blocks + dense copies for prefill, fused decode step, multi-step trips);
- resident_lean: `--quantized-weights native` (blocks only: the kernels an offloaded model runs), fused step;
- resident_lean_plain: the same with the fused decode step off — the per-layer path streaming needs, so
  the rows below differ from it only in where the bytes live;
- offload_warm: `--max-weight-memory FILE/3`; streamed layers' pages leave the process after each use but
  stay in the page cache;
- offload_cold: also evicted from the page cache after each use (`--offload-drop-page-cache`): every step
  reads the disk, as on a machine whose memory cannot hold the weights;
- offload_cold_read_ahead: the same with kiln's background read-ahead of the next layer (`--offload-read-ahead`).

Load-time peak (the "load_peak" section; `--load-peak-only` measures just it and keeps the decode runs of
the result file): `kiln.loader.load_peak` loads the model once in a fresh process and reports VmHWM minus the
resident set after imports — kiln's default and blocks-only loads without a budget, the budget with the
streamed load (built on the meta device, layer by layer into the spill file) and with the eager path
(load fully, then move layers: what every budgeted load did before), and the vocabulary alone (header
reader + tokenizer, no weights). The same budget pair for a Hugging Face safetensors folder: the default
model written as an fp16 folder (kiln's own folder writer, 2 shards) and loaded in bf16 under a third of
its safetensors bytes, streamed (kiln.loader.streamed_load.SafetensorsSource) and eager.

Each run decodes 128 greedy tokens (EOS ignored) after a chat prompt; tok/s between the first and the last
token. Recorded per run: the tokens (every configuration must give the resident_lean tokens), resident
vs mapped weight bytes, and the process's resident set after decode (VmRSS, anonymous + file pages) and
its growth from before the model loaded (torch and kiln imported): weights, the 64 MiB KV cache,
activations, and what the allocator kept.
Writes benchmarks/results/weight_offload.json.
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

from gemma3_decode import machine  # noqa: E402 (a sibling script: benchmarks/ is on the path)

OUT = Path(__file__).parent / "results" / "weight_offload.json"
TOKENS = 128
BUDGET_FRACTION = 1 / 3
CONFIGS: dict[str, dict[str, Any]] = {
    "resident_auto": {},
    "resident_lean": {"quantized_weights": "native"},
    "resident_lean_plain": {"quantized_weights": "native", "fused_decode_step": False},
    "offload_warm": {"offload": True},
    "offload_cold": {"offload": True, "offload_drop_page_cache": True},
    "offload_cold_read_ahead": {"offload": True, "offload_drop_page_cache": True, "offload_read_ahead": True},
}


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def kiln_run(config: str, threads: int, budget: int) -> None:
    """Child process: one configuration, prints a JSON line."""
    import torch

    from kiln import LLM, SamplingParams
    from kiln.entrypoints.info import weight_memory_line
    from kiln.offload.weight_offload import model_weight_tensors, unique_bytes

    torch.set_num_threads(threads)
    rss_before_load = _status("VmRSS")
    kwargs = dict(CONFIGS[config])
    if kwargs.pop("offload", False):
        kwargs["max_weight_memory"] = budget
    llm = LLM("smollm2-135m", threads=threads, enable_prefix_caching=False, kv_cache_memory="64MiB", **kwargs)
    tok = llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot "
                                                  "who learns to paint, in five sentences."}]), add_special_tokens=False)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    times, tokens = [], []
    for out in llm.generate_stream({"prompt_token_ids": prompt}, params):
        times.append(time.perf_counter())
        tokens = list(out.outputs[0].token_ids)
    loaded = llm.engine.loaded
    report = loaded.offload
    resident = report.resident_bytes if report else unique_bytes(model_weight_tensors(loaded.model))
    print(json.dumps({"tok_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": tokens,
                      "weights_resident_bytes": resident, "weights_mapped_bytes": report.mapped_bytes if report else 0,
                      "spilled_layers": len(report.spilled_layers) if report else 0,
                      "rss_after_decode_bytes": _status("VmRSS"),
                      "rss_before_load_bytes": rss_before_load, "rss_file_bytes": _status("RssFile"),
                      "decode_path": loaded.model.decode_plan_status, "weights_line": weight_memory_line(loaded)}))


LOAD_CONFIGS: dict[str, dict[str, Any]] = {
    "resident_auto": {"quantized_weights": "auto"},
    "resident_lean": {"quantized_weights": "native"},
    "budget_eager": {"budgeted": True, "streamed": False},
    "budget_streamed": {"budgeted": True, "streamed": True},
    "vocabulary_only": {"tokenizer_only": True},
    "folder_budget_eager": {"folder": True, "streamed": False},
    "folder_budget_streamed": {"folder": True, "streamed": True},
}
FOLDER_SHARDS = 2


def write_folder(gguf: Path, out: Path) -> int:
    """The GGUF model as an fp16 Hugging Face folder (dequantized; `FOLDER_SHARDS` safetensors files + index)
    → its safetensors bytes."""
    from safetensors.torch import save_file

    from kiln.loader.model_loader import load_model
    from kiln.quantization.checkpoint import checkpoint_tensors, save_quantized

    loaded = load_model(gguf, dtype="float32", quantized_weights="dequantize")
    save_quantized(out, loaded.model, loaded.config, loaded.tokenizer, None)
    tensors = checkpoint_tensors(loaded.model)
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{FOLDER_SHARDS:05d}.safetensors" for i in range(FOLDER_SHARDS)]
    weight_map = {name: files[i * FOLDER_SHARDS // len(names)] for i, name in enumerate(names)}
    for f in files:
        save_file({n: tensors[n] for n in names if weight_map[n] == f}, str(out / f), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum((out / f).stat().st_size for f in files)


def load_peaks(gguf: Path, budget: int, rounds: int, threads: int) -> dict[str, Any]:
    """The load-time peak of each LOAD_CONFIGS entry, alternating over `rounds` fresh processes."""
    import tempfile

    from kiln.loader.load_peak import measure_load_peak

    runs: dict[str, list[dict[str, Any]]] = {}
    start_load = os.getloadavg()
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory) / "hf-fp16"
        folder_bytes = write_folder(gguf, folder)
        spill = Path(directory) / "spill"
        spill.mkdir()
        for _ in range(rounds):
            for name, cfg in LOAD_CONFIGS.items():
                kwargs = dict(cfg)
                b = budget if kwargs.pop("budgeted", False) else 0
                path = gguf
                if kwargs.pop("folder", False):
                    path, b = folder, folder_bytes // 3
                    kwargs["dtype"] = "bfloat16"
                run = measure_load_peak(path, b, directory=spill, threads=threads, **kwargs)
                runs.setdefault(name, []).append(run)
                print(f"load {name}: peak {run['load_peak_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    summary = {name: {"median_load_peak_bytes": statistics.median(r["load_peak_bytes"] for r in rs),
                      "min_load_peak_bytes": min(r["load_peak_bytes"] for r in rs),
                      "max_load_peak_bytes": max(r["load_peak_bytes"] for r in rs),
                      "median_load_s": statistics.median(r.get("load_s", 0.0) for r in rs),
                      "median_rss_after_load_bytes": statistics.median(r.get("rss_after_load_bytes", 0) for r in rs),
                      "weights_resident_bytes": rs[0].get("weights_resident_bytes", 0),
                      "weights_mapped_bytes": rs[0].get("weights_mapped_bytes", 0)}
               for name, rs in runs.items()}
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds,
            "folder_bytes": folder_bytes, "folder_budget_bytes": folder_bytes // 3, "load_average_start": start_load, "load_average_end": os.getloadavg(), "runs": runs, "summary": summary}


def kiln_process(config: str, threads: int, budget: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", config, "--threads", str(threads),
                          "--budget", str(budget)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=sorted(CONFIGS))
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--load-peak-only", action="store_true",
                        help="measure the load-time peaks only, keeping the decode runs already in --out")
    args = parser.parse_args()
    if args.child:
        kiln_run(args.child, args.threads, args.budget)
        return
    from kiln.hub import pull

    gguf = pull("smollm2-135m")
    file_bytes = gguf.stat().st_size
    budget = int(file_bytes * BUDGET_FRACTION)
    if args.load_peak_only:
        result = json.loads(args.out.read_text())
        if result["budget_bytes"] != budget:
            raise SystemExit(f"{args.out} was measured at another budget ({result['budget_bytes']} bytes)")
        result["load_peak"] = load_peaks(gguf, budget, args.rounds, args.threads)
        result["load_peak"]["machine"] = machine(args.threads)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        return
    result: dict[str, Any] = {"model": gguf.name, "file_bytes": file_bytes, "budget_bytes": budget,
                              "tokens": TOKENS, "machine": machine(args.threads),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}
    for _ in range(args.rounds):
        for name in CONFIGS:
            run = kiln_process(name, args.threads, budget)
            result["runs"].setdefault(name, []).append(run)
            print(f"{name}: {run['tok_s']:.1f} tok/s, {run['weights_resident_bytes'] / 2**20:.1f} MiB resident, "
                  f"RSS {run['rss_after_decode_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    reference = result["runs"]["resident_lean"][0]["tokens"]
    default = result["runs"]["resident_auto"][0]["tokens"]
    result["summary"] = {
        name: {"median_tok_s": statistics.median(r["tok_s"] for r in runs),
               "min_tok_s": min(r["tok_s"] for r in runs), "max_tok_s": max(r["tok_s"] for r in runs),
               "weights_resident_bytes": runs[0]["weights_resident_bytes"],
               "weights_mapped_bytes": runs[0]["weights_mapped_bytes"],
               "median_rss_after_decode_bytes": statistics.median(r["rss_after_decode_bytes"] for r in runs),
               "median_rss_growth_bytes": statistics.median(r["rss_after_decode_bytes"] - r["rss_before_load_bytes"]
                                                            for r in runs),
               "same_tokens_as_resident_lean": all(r["tokens"] == reference for r in runs),
               "same_tokens_as_resident_auto": all(r["tokens"] == default for r in runs),
               "decode_path": runs[0]["decode_path"]}
        for name, runs in result["runs"].items()}
    result["machine"]["load_average_end"] = os.getloadavg()
    result["load_peak"] = load_peaks(gguf, budget, args.rounds, args.threads)
    result["load_peak"]["machine"] = machine(args.threads)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, s in result["summary"].items():
        print(f"{name:28s} {s['median_tok_s']:7.1f} tok/s  resident {s['weights_resident_bytes'] / 2**20:6.1f} MiB  "
              f"same tokens {s['same_tokens_as_resident_lean']}")


if __name__ == "__main__":
    main()
