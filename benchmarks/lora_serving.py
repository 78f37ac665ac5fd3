"""LoRA serving vs merging on the default model, in one run: tokens/s of 32 concurrent requests and memory.

Configurations, each in a fresh process (peak RSS is its own), run one after another:
  base          the default model alone (GGUF Q4_1 blocks, kiln's block kernels), LoRA off
  lora_1/4/16   the same base with LoRA on: the 32 requests spread round-robin over 1, 4 and 16
                adapters (rank 16, all seven projections; --max-loras 16 so all stay resident), the
                deltas added per adapter segment on top of the Q4_1 layers
  base_dense    the base dequantized (what a merged model is, unless re-quantized)
  merged        adapter 0 merged into the weights (kiln.lora.merge), saved as float16 and loaded back
Every run: 32 prompts at once, greedy, 64 new tokens each (ignore_eos), after one warm-up request;
tokens/s = 32 x 64 / wall time of the generate call. `decode_path` is the model's fused-plan status
(whether the plan exists, for base rows); steps with LoRA rows never run it (kiln.lora). The adapters are synthetic (seeded random A/B in
PEFT's file format, lora_alpha = r): speed does not depend on their values.

Writes benchmarks/results/lora_serving.json (machine: CPU, cores, threads, torch, load average).
Usage: python benchmarks/lora_serving.py [--threads T] [--new-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results" / "lora_serving.json"
CONCURRENCY = 32
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUBJECTS = ["Paris", "a golden retriever", "pizza", "the Moon", "a bicycle", "Tokyo", "chocolate", "a laptop",
            "jazz music", "an elephant", "coffee", "Mount Everest", "a violin", "London", "the internet", "a penguin",
            "sushi", "the Pacific Ocean", "New York", "tea", "a dolphin", "a guitar", "Rome", "an apple", "the Sun",
            "a train", "Berlin", "ice cream", "a tiger", "football", "a camera", "chess"]


def write_adapters(root: Path, n: int) -> list[Path]:
    """`n` PEFT-format adapters for SmolLM2-135M (30 layers, hidden 576, 3 KV heads of 64, FFN 1536)."""
    import torch
    from safetensors.torch import save_file

    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    folders = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(30):
            for module, (out, inp) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{blocks[module]}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen) / inp ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.01
        folder = root / f"adapter{i}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": list(TARGETS),
             "bias": "none", "base_model_name_or_path": "smollm2-135m"}))
        folders.append(folder)
    return folders


def merged_folder(root: Path, adapter: Path) -> Path:
    import torch

    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model
    from kiln.lora.adapter import load_adapter
    from kiln.lora.merge import merge_into
    from kiln.quantization.checkpoint import save_quantized

    loaded = load_model(resolve_model("smollm2-135m"), dtype=torch.float32, quantized_weights="dequantize")
    merge_into(loaded.model, load_adapter("a", adapter, loaded.model, RANK, torch.float32))
    return save_quantized(root / "merged", loaded.model, loaded.config, loaded.tokenizer, None)


def run_one(config: str, root: Path, threads: int | None, new_tokens: int) -> dict[str, Any]:
    """One configuration, in this process."""
    from kiln import LLM, LoRARequest, SamplingParams

    adapters = sorted(p for p in root.glob("adapter*"))
    opts: dict[str, Any] = {"threads": threads} if threads else {}
    model, n_adapters = "smollm2-135m", 0
    if config.startswith("lora_"):
        n_adapters = int(config.split("_")[1])
        opts |= {"loras": [f"a{i}={adapters[i]}" for i in range(n_adapters)], "max_loras": 16, "max_lora_rank": RANK}
    elif config == "base_dense":
        opts["quantized_weights"] = "dequantize"
    elif config == "merged":
        model = str(root / "merged")
    llm = LLM(model, **opts)
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"Tell me about {s}."}]) for s in SUBJECTS]
    loras = [LoRARequest(f"a{i % n_adapters}") for i in range(CONCURRENCY)] if n_adapters else None
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8), lora_request=loras[:2] if loras else None)
    start = time.perf_counter()
    outs = llm.generate(prompts[:CONCURRENCY], params, lora_request=loras)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    lora = llm.engine.lora
    return {"config": config, "adapters": n_adapters, "tokens_per_s": round(generated / wall, 1),
            "wall_s": round(wall, 2), "generated_tokens": generated,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "lora_slot_mib": round(lora.slot_bytes() / (1 << 20), 1) if lora else 0.0,
            "adapter_host_mib": round(sum(a.num_bytes() for a in lora.by_id.values()) / (1 << 20), 1) if lora else 0.0,
            "decode_path": llm.engine.loaded.model.decode_plan_status}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, Path(args.root), args.threads, args.new_tokens)))
        return
    import torch

    from kiln.planner.calibration import cpu_name

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = write_adapters(root, 16)
        merged_folder(root, adapters[0])
        for config in ("base", "lora_1", "lora_4", "lora_16", "base_dense", "merged"):
            cmd = [sys.executable, __file__, "--one", config, "--root", tmp, "--new-tokens", str(args.new_tokens)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["config"] == "base")["tokens_per_s"]
    result = {
        "benchmark": "lora_serving", "model": "smollm2-135m (GGUF Q4_1, default dtype)", "date": started,
        "concurrency": CONCURRENCY, "new_tokens": args.new_tokens, "adapter_rank": RANK,
        "adapter_targets": list(TARGETS), "rows": rows,
        "vs_base": {r["config"]: round(r["tokens_per_s"] / base, 3) for r in rows},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg()},
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["vs_base"]))


if __name__ == "__main__":
    main()
