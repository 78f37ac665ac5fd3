"""Quantized matmul kernels vs the bf16 GEMM, on the default model's layer shapes.

For each shape [N, K] and batch M: kiln's native int8·int4 (Q4_1) / int8·int8 (Q8_0) block
kernel, the same weights dequantized per call + bf16 GEMM (what kiln does above the
crossover), and a resident bf16 weight with `F.linear` (the dense baseline). Median of
repeated timings in one process, 2 threads. Writes benchmarks/results/quant_kernels.json; the
crossover M it reports is where `GGUFQuantLinearMethod.dense_threshold` comes from.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from kiln.kernels.native import load_native
from kiln.kernels.quant_matmul import dequantize
from kiln.layers.gguf_quant import GGUFQuantizedTensor, pack_blocks

OUT = Path(__file__).parent / "results" / "quant_kernels.json"
# SmolLM2-135M: qkv, o, gate_up, down, tied LM head (Q8_0 in the default GGUF)
SHAPES = [("qkv_proj", 960, 576, "Q4_1"), ("o_proj", 576, 576, "Q4_1"), ("gate_up_proj", 3072, 576, "Q4_1"),
          ("down_proj", 576, 1536, "Q4_1"), ("lm_head", 49152, 576, "Q8_0")]
MS = [1, 2, 4, 8, 16, 32, 64]


def timeit(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    if not load_native():
        sys.exit("native kernels unavailable; nothing to measure")
    rows = []
    for name, n, k, qtype in SHAPES:
        w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
        t = GGUFQuantizedTensor(qtype, torch.from_numpy(quantize(w, GGMLQuantizationType[qtype])), k)
        qs, d, m = pack_blocks(t)
        is_q4 = qtype != "Q8_0"
        dense = dequantize(qs, d, m, is_q4, torch.bfloat16)
        for mm in MS:
            x = torch.randn(mm, k, dtype=torch.bfloat16)
            kernel = timeit(lambda: torch.ops.kiln.quant_matmul(x, qs, d, m, is_q4))
            deq = timeit(lambda: F.linear(x, dequantize(qs, d, m, is_q4, torch.bfloat16)))
            bf16 = timeit(lambda: F.linear(x, dense))
            rows.append({"layer": name, "N": n, "K": k, "type": qtype, "M": mm, "kernel_us": kernel * 1e6,
                         "dequant_gemm_us": deq * 1e6, "bf16_resident_us": bf16 * 1e6,
                         "kernel_speedup_over_bf16": bf16 / kernel})
            print(f"{name:13s} M={mm:3d}  kernel {kernel*1e6:8.1f} us  dequant+gemm {deq*1e6:8.1f} us  "
                  f"bf16 {bf16*1e6:8.1f} us  ({bf16/kernel:.2f}x)", file=sys.stderr)
    crossover = {}
    for mm in MS:
        kern = sum(r["kernel_us"] for r in rows if r["M"] == mm and r["type"] == "Q4_1")
        deq = sum(r["dequant_gemm_us"] for r in rows if r["M"] == mm and r["type"] == "Q4_1")
        crossover[mm] = {"kernel_us": kern, "dequant_gemm_us": deq}
    report = {"benchmark": "quant_kernels", "threads": 2, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "rows": rows,
              "per_layer_set_q4_1_by_M": crossover,
              "kernel_beats_dequant_gemm_up_to_M": max([mm for mm, c in crossover.items()
                                                       if c["kernel_us"] < c["dequant_gemm_us"]], default=0)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
