"""Quantized matmul kernels vs the bf16 GEMM, on the default model's layer shapes.

For each batch size M, every matmul of one decode step of the default model (30 layers of
qkv/o/gate_up/down in Q4_1 with distinct weights, so they stream from DRAM as in real decoding,
and the Q8_0 LM head) through: kiln's native int16·int4 / int16·int8 block kernel, a resident
bf16 copy with `F.linear` (the dense baseline), per-call dequantize + bf16 GEMM (the memory-lean
path), and — since kiln's default activation dtype on this CPU is fp32 — the kernel with fp32
activations against a resident fp32 copy, and the fp32 panel kernel (`quant_matmul_panels`:
weights dequantized panel by panel in L1, register-blocked FMAs) that takes medium M. 2 threads. Writes benchmarks/results/quant_kernels.json; the crossover M
it reports is where `GGUFQuantLinearMethod`'s default `dense_threshold` and `panel_threshold` come from.
With KILN_KERNEL_MARCH=haswell the kernels are built for AVX2 (how a CPU without AVX-512 runs
them) and the result goes to benchmarks/results/quant_kernels_haswell.json instead.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from kiln.kernels.native import _march, load_native, simd_path
from kiln.kernels.quant_matmul import dequantize
from kiln.layers.gguf_quant import GGUFQuantizedTensor, default_panel_rows, pack_blocks

RESULTS = Path(__file__).parent / "results"
# SmolLM2-135M: qkv, o, gate_up, down, tied LM head (Q8_0 in the default GGUF)
SHAPES = [("qkv_proj", 960, 576, "Q4_1"), ("o_proj", 576, 576, "Q4_1"), ("gate_up_proj", 3072, 576, "Q4_1"),
          ("down_proj", 576, 1536, "Q4_1"), ("lm_head", 49152, 576, "Q8_0")]
MS = [1, 2, 4, 8, 16, 32, 64, 96, 128]


def model_stack(num_layers: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, bool, torch.Tensor]]:
    """Distinct weights for every layer of the model (so timings stream from DRAM as in a real
    decode step, not from a cache-hot single matrix): (name, qs, d, m, is_q4, bf16 dense)."""
    layers = []
    rng = np.random.default_rng(0)
    for i in range(num_layers):
        for name, n, k, qtype in SHAPES[:-1]:
            w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
            qs, d, m = pack_blocks(GGUFQuantizedTensor(qtype, torch.from_numpy(quantize(w, GGMLQuantizationType[qtype])), k))
            layers.append((name, qs, d, m, True, dequantize(qs, d, m, True, torch.bfloat16)))
    name, n, k, qtype = SHAPES[-1]
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    qs, d, m = pack_blocks(GGUFQuantizedTensor(qtype, torch.from_numpy(quantize(w, GGMLQuantizationType[qtype])), k))
    layers.append((name, qs, d, m, False, dequantize(qs, d, m, False, torch.bfloat16)))
    return layers


def main() -> None:
    torch.set_num_threads(2)
    if not load_native():
        sys.exit("native kernels unavailable; nothing to measure")
    stack = model_stack(30)
    stack32 = [dense.float() for *_, dense in stack]  # resident fp32 copies (kiln's default dtype here)
    rows = []
    for mm in MS:
        xs = {k: torch.randn(mm, k, dtype=torch.bfloat16) for k in {576, 1536}}
        per_layer = {name: {"kernel": 0.0, "bf16": 0.0, "dequant": 0.0, "kernel_fp32": 0.0, "fp32": 0.0, "panel": 0.0}
                     for name, *_ in SHAPES}
        for _ in range(5):  # rounds; each times every layer once per path, weights streaming from DRAM
            for (name, qs, d, m, is_q4, dense), dense32 in zip(stack, stack32):
                x = xs[dense.shape[1]]
                xf = x.float()
                for path, fn in (("kernel", lambda: torch.ops.kiln.quant_matmul(x, qs, d, m, is_q4)),
                                 ("bf16", lambda: F.linear(x, dense)),
                                 ("kernel_fp32", lambda: torch.ops.kiln.quant_matmul(xf, qs, d, m, is_q4)),
                                 ("fp32", lambda: F.linear(xf, dense32)),
                                 ("panel", lambda: torch.ops.kiln.quant_matmul_panels(xf, qs, d, m, is_q4)),
                                 ("dequant", lambda: F.linear(x, dequantize(qs, d, m, is_q4, torch.bfloat16)))):
                    if path == "dequant" and name == "lm_head":
                        continue  # 50+ ms per call; never chosen
                    t0 = time.perf_counter()
                    fn()
                    per_layer[name][path] += (time.perf_counter() - t0) / 5
        for name, t in per_layer.items():
            rows.append({"layer": name, "M": mm, "kernel_us": t["kernel"] * 1e6, "bf16_resident_us": t["bf16"] * 1e6,
                         "kernel_fp32_act_us": t["kernel_fp32"] * 1e6, "fp32_resident_us": t["fp32"] * 1e6,
                         "panel_fp32_us": t["panel"] * 1e6,
                         "dequant_gemm_us": t["dequant"] * 1e6 if name != "lm_head" else None})
        total = {p: sum(t[p] for t in per_layer.values()) * 1e3 for p in ("kernel", "bf16")}
        print(f"M={mm:3d}: one decode step's matmuls  kernel {total['kernel']:6.2f} ms  bf16 {total['bf16']:6.2f} ms "
              f"({total['bf16'] / total['kernel']:.2f}x)", file=sys.stderr)
    steps = {mm: {p: sum(r[p] for r in rows if r["M"] == mm and r[p] is not None) / 1e3
                  for p in ("kernel_us", "bf16_resident_us", "kernel_fp32_act_us", "fp32_resident_us", "panel_fp32_us")}
             for mm in MS}
    report = {"benchmark": "quant_kernels", "simd_path": simd_path(), "march": _march(), "threads": 2, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "what": "sum over one decode step's matmuls of SmolLM2-135M (30 layers x qkv/o/gate_up/down in Q4_1 "
                      "+ Q8_0 LM head), distinct weights per layer, mean of 5 rounds, milliseconds",
              "step_ms_by_M": {mm: {"kernel": v["kernel_us"], "bf16_resident": v["bf16_resident_us"],
                                    "kernel_speedup": v["bf16_resident_us"] / v["kernel_us"],
                                    "kernel_fp32_act": v["kernel_fp32_act_us"], "fp32_resident": v["fp32_resident_us"],
                                    "kernel_speedup_vs_fp32": v["fp32_resident_us"] / v["kernel_fp32_act_us"],
                                    "panel_fp32": v["panel_fp32_us"],
                                    "panel_speedup_vs_fp32": v["fp32_resident_us"] / v["panel_fp32_us"]}
                               for mm, v in steps.items()},
              # the fp32 path's three kernels: block kernel up to here, panel kernel above it ...
              "panel_beats_block_from_M": min(
                  [mm for mm, v in steps.items() if v["panel_fp32_us"] < v["kernel_fp32_act_us"]], default=None),
              # ... and up to here, the resident fp32 GEMM above
              "kiln_panel_rows": list(default_panel_rows()),  # the range the code uses (PANEL_ROWS)
              "panel_beats_fp32_up_to_M": max(
                  [mm for mm, v in steps.items() if v["panel_fp32_us"] < v["fp32_resident_us"]], default=0),
              "kernel_beats_fp32_up_to_M": max(
                  [mm for mm, v in steps.items() if v["kernel_fp32_act_us"] < v["fp32_resident_us"]], default=0),
              "kernel_beats_bf16_up_to_M": max([mm for mm, v in steps.items() if v["kernel_us"] < v["bf16_resident_us"]],
                                               default=0),
              # the four layer types only: the LM head has no dequantize row
              "kernel_beats_dequantize_up_to_M": max(
                  [mm for mm in MS if sum(r["kernel_us"] for r in rows if r["M"] == mm and r["dequant_gemm_us"])
                   < sum(r["dequant_gemm_us"] for r in rows if r["M"] == mm and r["dequant_gemm_us"])], default=0),
              "rows": rows}
    out = RESULTS / ("quant_kernels.json" if _march() == "native" else f"quant_kernels_{_march()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
