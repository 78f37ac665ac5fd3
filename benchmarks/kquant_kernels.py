"""K-quant kernels (Q4_K, Q5_K, Q6_K super-blocks as stored) vs the dequantized dense paths, on the
real layer shapes of Gemma 3 270M's Q4_K_M file.

For each kind, the matmuls one decode step does in that kind (distinct weights, so they stream from
DRAM as in real decoding) at M = 1 and M = 16 through:
- `native`: torch.ops.kiln.kquant_matmul (fp32 and bf16 activations); `panel` at M=16 (fp32);
- `dense_bf16` / `dense_fp32`: F.linear on a resident dequantized copy (what `quantized_weights=dequantize` runs);
- Q4_K only, `q4_1_repack`: the blocks repacked at load to Q4_1 (fp16-rounded scales) on the Q4 block
  kernel, the path Q4_K took before its exact kernel: the choice between the two is made from this.
Weights: the file's own Q6_K (9 ffn_down) and Q4_K (9 ffn_down + 18 attn_output) tensors; the file has no
Q5_K, so Q5_K runs on random valid super-blocks of the ffn_down shape, one per layer (a kernel's speed does
not depend on the values). Figures are the low percentile of ROUNDS alternating rounds, µs per step.
Writes benchmarks/results/kquant_kernels.json (machine, threads and load average included).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).parent / "results" / "kquant_kernels.json"


def gemma_weights() -> dict[str, list[torch.Tensor]]:
    """Raw super-blocks uint8 [N, row bytes] of every Q4_K / Q6_K matrix in the file, and Q5_K stand-ins."""
    from gguf import GGUFReader

    from kiln.hub import pull
    from kiln.kernels.kquant_matmul import KQUANT_BYTES

    reader = GGUFReader(pull("gemma3-270m"), "r")
    out: dict[str, list[torch.Tensor]] = {"Q4_K": [], "Q5_K": [], "Q6_K": []}
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in out and len(t.shape) == 2:
            cols, rows = int(t.shape[0]), int(t.shape[1])
            out[kind].append(torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, cols // 256 * KQUANT_BYTES[kind])))
        if kind in out and t.name.endswith("ffn_down.weight"):
            cols, rows = int(t.shape[0]), int(t.shape[1])
            b = rng.integers(0, 256, size=(rows, cols // 256, 176), dtype=np.uint8)
            b[..., 0:2] = b[..., 2:4] = rng.uniform(1e-4, 3e-3, (rows, cols // 256, 1)).astype(np.float16).view(np.uint8)
            out["Q5_K"].append(torch.from_numpy(b.reshape(rows, -1)))
    return out


def machine(threads: int) -> dict[str, Any]:
    from kiln.kernels.native import simd_path
    from kiln.kernels.tune import cpu_identity

    cpu, flags = cpu_identity()
    return {"cpu": cpu, "flags": list(flags), "cores": os.cpu_count(), "threads": threads, "simd": simd_path(),
            "torch": torch.__version__, "load_average_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    from kiln.kernels.kquant_matmul import KQUANT_CODES
    from kiln.kernels.native import load_native
    from kiln.kernels.quant_matmul import quant_matmul
    from kiln.layers.gguf_quant import GGUFQuantizedTensor, pack_blocks
    from kiln.layers.gguf_repack import repack
    from kiln.planner.calibration import low

    if not load_native():
        raise SystemExit("native kernels unavailable; nothing to measure")
    torch.set_num_threads(args.threads)
    ops = torch.ops.kiln
    weights = gemma_weights()
    result: dict[str, Any] = {"machine": machine(args.threads), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "rounds": args.rounds, "kinds": {}}
    for kind, ws in weights.items():
        code = KQUANT_CODES[kind]
        ks = [w.shape[1] // {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[kind] * 256 for w in ws]
        dense32 = [ops.kquant_dequantize(w, k, code, torch.float32) for w, k in zip(ws, ks)]
        dense16 = [d.to(torch.bfloat16) for d in dense32]
        repacked = []
        if kind == "Q4_K":
            repacked = [pack_blocks(GGUFQuantizedTensor("Q4_1", torch.from_numpy(repack("Q4_K", w.numpy())), k))
                        for w, k in zip(ws, ks)]
        entry: dict[str, Any] = {"linears": len(ws), "shapes": sorted({(w.shape[0], k) for w, k in zip(ws, ks)}),
                                 "weight_mib": sum(w.numel() for w in ws) / 2**20, "us_per_step": {}}
        for m in (1, 16):
            x32 = [torch.randn(m, k) for k in ks]
            x16 = [x.to(torch.bfloat16) for x in x32]
            paths: dict[str, Callable[[], object]] = {
                "native_fp32": lambda: [ops.kquant_matmul(x, w, code) for x, w in zip(x32, ws)],
                "native_bf16": lambda: [ops.kquant_matmul(x, w, code) for x, w in zip(x16, ws)],
                "dense_fp32": lambda: [F.linear(x, d) for x, d in zip(x32, dense32)],
                "dense_bf16": lambda: [F.linear(x, d) for x, d in zip(x16, dense16)],
            }
            if m > 1:
                paths["panel_fp32"] = lambda: [ops.kquant_matmul_panels(x, w, code) for x, w in zip(x32, ws)]
            if repacked:
                paths["q4_1_repack_fp32"] = lambda: [quant_matmul(x, *r, True) for x, r in zip(x32, repacked)]
                paths["q4_1_repack_bf16"] = lambda: [quant_matmul(x, *r, True) for x, r in zip(x16, repacked)]
            samples: dict[str, list[float]] = {}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, fn in paths.items():
                        fn()  # warm-up: first touch, oneDNN's primitive cache
                        t = time.perf_counter()
                        fn()
                        samples.setdefault(name, []).append(time.perf_counter() - t)
            us = {name: round(low(v) * 1e6, 1) for name, v in samples.items()}
            us["speedup_native_bf16_vs_dense_bf16"] = round(us["dense_bf16"] / us["native_bf16"], 2)
            us["speedup_native_fp32_vs_dense_fp32"] = round(us["dense_fp32"] / us["native_fp32"], 2)
            entry["us_per_step"][f"M={m}"] = us
            print(kind, f"M={m}", json.dumps(us))
        result["kinds"][kind] = entry
    result["machine"]["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
