"""`kiln tune`'s measurement: every kernel path for a block-quantized linear at every batch size in
kiln.kernels.tune.ROWS, on the tuning model's Q4 linears in turn (distinct weights, as a decode step
streams them), fp32 and bf16 activations, alternating rounds, then the K-quant kinds on the same shapes
(kiln.tuning.kquant_tune); the crossovers are fitted and saved by
kiln.kernels.tune, where the engine's linears pick them up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from kiln.kernels.tune import DENSE_KERNEL_ROWS, ROWS, crossovers, dense_copy_dtype, dense_kernel_limit, fingerprint, low, save


def _linears(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from kiln.layers.gguf_quant import GGUFQuantLinearMethod

    out = []
    for layer in model.layers:
        for module in layer.modules():
            method = getattr(module, "method", None)
            if isinstance(method, GGUFQuantLinearMethod) and method.is_q4:
                out.append((module.qs, module.d, module.m))
    return out


def _step_time(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(model: str = "smollm2-135m", threads: int | None = None, rounds: int = 3,
            log: Callable[[str], None] = lambda s: None, rows: tuple[int, ...] = ROWS) -> dict[str, Any]:
    """Time every path at every M on `model`'s Q4 linears, save the crossovers for this machine, return them."""
    from kiln.hub import resolve_model
    from kiln.kernels.native import load_native, simd_path
    from kiln.kernels.packed_linear import resident_copy, resident_linear
    from kiln.kernels.quant_matmul import dequantize
    from kiln.loader.model_loader import load_model

    if not load_native():
        raise RuntimeError("kiln tune needs kiln's native kernels (a C++ compiler); the plain-torch path has no choice to tune")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    loaded = load_model(resolve_model(model), dtype="float32", quantized_weights="native")
    linears = _linears(loaded.model)
    if not linears:
        raise RuntimeError(f"{model} has no GGUF Q4 linears to tune on; use a Q4_0/Q4_1 GGUF")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    dense = {name: [dequantize(qs, d, m, True, dt) for qs, d, m in linears] for name, dt in dtypes.items()}
    # the resident path as the engine keeps it: packed for oneDNN where that works (kiln.kernels.packed_linear)
    resident = {name: [resident_copy(w) for w in ws] for name, ws in dense.items()}
    panel_ok = simd_path() == "AVX-512"
    simd = simd_path() in ("AVX-512", "AVX2")  # the dense kernel's scalar loop is never a candidate
    samples: dict[str, dict[str, dict[str, list[float]]]] = {n: {str(m): {} for m in rows} for n in dtypes}
    ops = torch.ops.kiln
    with torch.inference_mode():
        for r in range(rounds):
            log(f"round {r + 1} of {rounds} ...")
            for name, dt in dtypes.items():
                for m in rows:
                    xs = [torch.randn(m, d.shape[1] * 32, dtype=dt) for _, d, _ in linears]
                    paths: dict[str, Callable[[], None]] = {
                        "block": lambda: [ops.quant_matmul(x, qs, d, mm, True) for x, (qs, d, mm) in zip(xs, linears)],
                        "resident": lambda: [resident_linear(x, w) for x, w in zip(xs, resident[name])],
                        "dequantize": lambda: [torch.nn.functional.linear(x, dequantize(qs, d, mm, True, dt))
                                               for x, (qs, d, mm) in zip(xs, linears)],
                    }
                    if name == "float32":  # fp32 activations through a bf16 copy: the casts in and out included
                        paths["resident_bf16"] = lambda: [resident_linear(x, w) for x, w in zip(xs, resident["bfloat16"])]
                    if m <= DENSE_KERNEL_ROWS and simd:  # a dense model's weights, kiln's kernel
                        paths["dense_kernel"] = lambda: [ops.dense_matmul(x, w) for x, w in zip(xs, dense[name])]
                    if panel_ok and name == "float32":
                        paths["panel"] = lambda: [ops.quant_matmul_panels(x, qs, d, mm, True)
                                                  for x, (qs, d, mm) in zip(xs, linears)]
                    for path, fn in paths.items():
                        fn()  # warm-up: first touch, oneDNN's primitive cache
                        samples[name][str(m)].setdefault(path, []).append(_step_time(fn))
    times = {n: {m: {p: low(v) for p, v in paths.items()} for m, paths in by_m.items()} for n, by_m in samples.items()}
    from kiln.tuning.kquant_tune import measure_kinds

    # the K-quant kernels (Q4_K/Q5_K/Q6_K) on this model's linear shapes: their own crossovers
    kinds = measure_kinds([(d.shape[0], d.shape[1] * 32) for _, d, _ in linears], rows, rounds, panel_ok, low, log)
    fp = fingerprint(threads)
    result = {"fingerprint": fp, "date": time.strftime("%Y-%m-%d %H:%M"), "model": model, "linears": len(linears),
              "rows": list(rows), "seconds_per_step": times,
              "crossovers": {n: {"resident": crossovers(times[n], rows, True),
                                 "no_resident": crossovers(times[n], rows, False)} for n in dtypes},
              "fp32_dense_copy": dense_copy_dtype(times["float32"], rows), "kinds": kinds,
              "dense_kernel_rows": {n: dense_kernel_limit(times[n], rows) for n in dtypes} if simd else {}}
    save(result)
    return result


__all__ = ["measure"]
