"""`kiln tune`'s measurement of the K-quant kinds (Q4_K, Q5_K, Q6_K super-blocks run as stored).

Their kernels differ from the Q4 block kernel (super-block scales, 5- and 6-bit unpacking), so their
crossovers are measured on their own: every path (block kernel, panel kernel, resident dense GEMM in the
activation dtype or bf16, dequantize per call) at every M, on synthetic random super-blocks with the
tuning model's linear shapes (K rounded up to a multiple of 256, which the super-blocks need). A kernel's
time does not depend on the weights' values, only on their layout and shape."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kiln.kernels.tune import crossovers


def _random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    from kiln.kernels.kquant_matmul import KQUANT_BYTES, QKK

    b = rng.integers(0, 256, size=(n, k // QKK, KQUANT_BYTES[qtype]), dtype=np.uint8)
    scale = rng.uniform(1e-4, 3e-3, (n, k // QKK, 1)).astype(np.float16).view(np.uint8)
    if qtype == "Q6_K":
        b[..., 208:210] = scale
    else:
        b[..., 0:2] = b[..., 2:4] = scale
    return torch.from_numpy(b.reshape(n, -1))


def _step_time(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_kinds(shapes: list[tuple[int, int]], rows: tuple[int, ...], rounds: int, panel_ok: bool,
                  low: Callable[[list[float]], float], log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """{kind: {"seconds_per_step": {dtype: {M: {path: s}}}, "crossovers": {dtype: {"resident"|"no_resident": ...}}}}
    for `shapes` [(N, K)] (one weight each, distinct, as a decode step streams them)."""
    from kiln.kernels.kquant_matmul import KQUANT_CODES, QKK
    from kiln.kernels.packed_linear import resident_copy, resident_linear

    rng = np.random.default_rng(0)
    shapes = [(n, -(-k // QKK) * QKK) for n, k in shapes]
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    ops = torch.ops.kiln
    out: dict[str, Any] = {}
    for kind, code in KQUANT_CODES.items():
        log(f"{kind}: {rounds} round(s) ...")
        ws = [_random_blocks(kind, n, k, rng) for n, k in shapes]
        dense = {name: [ops.kquant_dequantize(w, k, code, dt) for w, (_, k) in zip(ws, shapes)]
                 for name, dt in dtypes.items()}
        resident = {name: [resident_copy(d) for d in ds] for name, ds in dense.items()}  # as the engine keeps them
        samples: dict[str, dict[str, dict[str, list[float]]]] = {n: {str(m): {} for m in rows} for n in dtypes}
        with torch.inference_mode():
            for _ in range(rounds):
                for name, dt in dtypes.items():
                    for m in rows:
                        xs = [torch.randn(m, k, dtype=dt) for _, k in shapes]
                        paths: dict[str, Callable[[], None]] = {
                            "block": lambda: [ops.kquant_matmul(x, w, code) for x, w in zip(xs, ws)],
                            "resident": lambda: [resident_linear(x, d) for x, d in zip(xs, resident[name])],
                            "dequantize": lambda: [torch.nn.functional.linear(x, ops.kquant_dequantize(w, x.shape[1], code, dt))
                                                   for x, w in zip(xs, ws)],
                        }
                        if name == "float32":
                            paths["resident_bf16"] = lambda: [resident_linear(x, d) for x, d in zip(xs, resident["bfloat16"])]
                            if panel_ok:
                                paths["panel"] = lambda: [ops.kquant_matmul_panels(x, w, code) for x, w in zip(xs, ws)]
                        for path, fn in paths.items():
                            fn()  # warm-up
                            samples[name][str(m)].setdefault(path, []).append(_step_time(fn))
        times = {n: {m: {p: low(v) for p, v in by_path.items()} for m, by_path in by_m.items()}
                 for n, by_m in samples.items()}
        out[kind] = {"seconds_per_step": times,
                     "crossovers": {n: {"resident": crossovers(times[n], rows, True),
                                        "no_resident": crossovers(times[n], rows, False)} for n in dtypes}}
    return out


__all__ = ["measure_kinds"]
