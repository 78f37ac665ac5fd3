"""`kiln tune`: measure, on this machine, which kernel runs a block-quantized linear fastest at each
batch size, and cache the crossovers for kiln to use instead of constants measured elsewhere.

The measurement itself is kiln.tuning.kernel_tune.measure; this module holds what the engine needs: the
fingerprint, the crossovers fitted to the measured times, and the lookup of this machine's file.

Candidates for a GGUF Q4/Q8 linear with M activation rows (kiln.layers.gguf_quant):
- `block`: the int16·int4/int8 block kernel (torch.ops.kiln.quant_matmul);
- `panel`: fp32 only, the panel kernel (blocks dequantized into L1 per panel; AVX-512 builds);
- `resident`: the dense GEMM (torch / oneDNN, which uses AMX where the CPU has it) on a resident copy in
  the activation dtype;
- `dequantize`: the weights dequantized per call, then the dense GEMM (what runs without a resident copy).
Each is timed on every Q4 linear of the tuning model's layers in turn (distinct weights, as a decode step
streams them, so caches play the part they play in the engine), for M in ROWS, fp32 and bf16
activations, in alternating rounds; a path's figure is the 10th percentile of its rounds.

The crossovers (per activation dtype: the largest M the block kernel wins up to, the panel kernel's range,
and where the dense GEMM takes over, with and without a resident copy) are cached in
$KILN_HOME/tune/<fingerprint>.json. The fingerprint names the CPU, its ISA flags, cores, threads, torch,
kiln's version and its native build: a different machine or build is untuned until `kiln tune` runs
there, and then kiln.layers.gguf_quant takes its thresholds from the file.
Q8_0 linears (the default model's tied LM head) take the Q4 crossovers: they are not timed on their own.
Dense fp32 / bf16 weights (models loaded from safetensors or dequantized): kiln's dense decode kernel
(kiln.kernels.dense_matmul) against torch's GEMM on the same shapes up to DENSE_KERNEL_ROWS rows, stored as
"dense_kernel_rows" per dtype.
The K-quant kinds (Q4_K/Q5_K/Q6_K super-blocks) are timed on their own (kiln.tuning.kquant_tune) on the same
shapes and stored under "kinds"; a tuning without them leaves those layers on the Q4 crossovers.
Invariant: tuning changes which kernel runs, never what a kernel computes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

ROWS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_int8", "amx_bf16")
VERSION = 1  # the file's layout


def low(times: list[float]) -> float:
    """The 10th percentile: what a step costs when the machine's other work leaves it alone.

    On a shared CPU the other processes only ever add time, and how much changes minute to minute
    (3x between two runs here); a low percentile estimates the cost itself, the median mostly the
    neighbours. Every calibration figure and every measurement the predictions are checked against
    uses this same statistic."""
    xs = sorted(times)
    return xs[int(0.1 * (len(xs) - 1))]


@functools.lru_cache(maxsize=1)
def cpu_identity() -> tuple[str, tuple[str, ...]]:
    """(model name, the ISA flags of ISA_FLAGS it has) from /proc/cpuinfo; ("unknown", ()) elsewhere."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, tuple(f for f in ISA_FLAGS if f in flags)


@functools.lru_cache(maxsize=8)
def fingerprint(threads: int) -> dict[str, Any]:
    """What a tuning is valid for (computed once per thread count and process)."""
    from importlib.metadata import PackageNotFoundError, version

    from kiln.kernels.native import current_build_folder, simd_path

    try:
        kiln_version = version("kiln-llm")
    except PackageNotFoundError:
        kiln_version = "source"
    cpu, flags = cpu_identity()
    build = current_build_folder()
    return {"cpu": cpu, "flags": list(flags), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "kiln": kiln_version, "native_build": build.name if build else None, "simd": simd_path(),
            "layout": VERSION}


def tune_file(fp: dict[str, Any]) -> Path:
    from kiln.hub import kiln_home

    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return kiln_home() / "tune" / f"{digest}.json"


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def load_tuning(threads: int | None = None) -> dict[str, Any] | None:
    """This machine's tuning for `threads` (default: torch's current count), or None if untuned."""
    from kiln.kernels.native import load_native

    if os.environ.get("KILN_NO_TUNE") or not load_native():
        return None
    return _load(str(tune_file(fingerprint(threads or torch.get_num_threads()))))


def crossovers(times: dict[str, dict[str, float]], rows: tuple[int, ...], resident: bool) -> dict[str, Any]:
    """One activation dtype's {M: {path: seconds}} → where kiln's kernels run, with (`resident`) or without
    a resident dense copy to fall back on: the block kernel for M <= `block_max`, the panel kernel for
    `panel` = [first, last] ([0, 0]: never), the dense GEMM above.

    The two breakpoints are the ones whose three regimes cost least summed over the measured M, each M
    weighted by its fastest path's time (so every M counts alike); a regime fit rather than each M's
    winner, because neighbouring M within a few percent flip winners from round to round."""
    has_panel = any("panel" in times[str(m)] for m in rows)
    # the fallback's GEMM: on the resident copy in its own dtype or, for fp32 activations, through a bf16 copy
    # (kiln.kernels.tune.dense_copy_dtype keeps whichever wins); without a copy, dequantize per call
    dense_paths = [p for p in (("resident", "resident_bf16") if resident else ("dequantize",))
                   if p in times[str(rows[0])]]

    def dense_time(t: dict[str, float]) -> float:
        return min(t[p] for p in dense_paths)

    def cost(a: int, b: int) -> float:
        total = 0.0
        for m in rows:
            t = times[str(m)]
            path_time = t["block"] if m <= a else t.get("panel", float("inf")) if m <= b else dense_time(t)
            best = min(t["block"], t.get("panel", float("inf")), dense_time(t))
            total += path_time / best
        return total

    breaks = (0, *rows)
    options = [(a, b) for a in breaks for b in breaks if b >= a and (has_panel or b == a)]
    a, b = min(options, key=lambda ab: (cost(*ab), -ab[0]))
    return {"block_max": a, "panel": [next(m for m in rows if m > a), b] if b > a else [0, 0]}


DENSE_KERNEL_ROWS = 16  # kiln's dense decode kernel is timed up to this M (it is a GEMV, not a GEMM)


def dense_kernel_limit(times: dict[str, dict[str, float]], rows: tuple[int, ...]) -> int:
    """One dtype's {M: {path: seconds}} → the largest M kiln's dense kernel (`dense_kernel`) runs dense weights
    for, instead of torch's GEMM (`resident`): the threshold whose two regimes cost least summed over the
    measured M (each M weighted by its faster path, as in `crossovers`); 0 when torch wins throughout."""
    measured = [m for m in rows if "dense_kernel" in times[str(m)]]

    def cost(a: int) -> float:
        total = 0.0
        for m in measured:
            t = times[str(m)]
            total += (t["dense_kernel"] if m <= a else t["resident"]) / min(t["dense_kernel"], t["resident"])
        return total

    return min((0, *measured), key=lambda a: (cost(a), -a))


def dense_copy_dtype(times: dict[str, dict[str, float]], rows: tuple[int, ...]) -> str:
    """fp32 activations: keep the resident dense copy (what prefill and the largest batches run) in bf16 when
    its GEMM, casts included, beats the fp32 GEMM by 10 % or more at the largest measured M; else fp32.
    The bf16 copy rounds the weights to 8 mantissa bits (the blocks themselves stay exact): its cost in
    quality is measured by benchmarks/kernel_tune.py."""
    big = times[str(max(rows))]
    if "resident_bf16" in big and big["resident_bf16"] <= 0.9 * big["resident"]:
        return "bfloat16"
    return "float32"


def copy_dtype(tuning: dict[str, Any] | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a resident dense copy is kept in for a model of `dtype` (the tuning's choice for fp32)."""
    if tuning is not None and dtype == torch.float32 and tuning.get("fp32_dense_copy") == "bfloat16":
        return torch.bfloat16
    return dtype


def limits(tuning: dict[str, Any], dtype: torch.dtype, resident: bool, kind: str | None = None) -> tuple[int, int] | None:
    """(largest M for the block kernel, largest M for the panel kernel) from a tuning, for activations
    of `dtype` and the Q4 block kernel or, with `kind`, a K-quant kind's kernel ('Q6_K', ...) (None: not
    tuned for that dtype or kind)."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype)
    source = tuning if kind is None else tuning.get("kinds", {}).get(kind, {})
    if name is None or name not in source.get("crossovers", {}):
        return None
    c = source["crossovers"][name]["resident" if resident else "no_resident"]
    return c["block_max"], c["panel"][1]


def save(result: dict[str, Any]) -> Path:
    """Write a measurement (kiln.tuning.kernel_tune.measure) where `load_tuning` finds it; returns the path."""
    path = tune_file(result["fingerprint"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)  # a reader sees the old file or the whole new one, never half of it
    _load.cache_clear()
    return path


def describe(tuning: dict[str, Any] | None) -> list[str]:
    """Lines for `kiln info`: the crossovers in use, or that none are tuned here."""
    if tuning is None:
        return ["kernel choice    untuned on this machine: built-in crossovers (run `kiln tune` to measure them here)"]
    lines = [f"kernel choice    tuned {tuning['date']} on this CPU, {tuning['fingerprint']['threads']} threads "
             "(M = activation rows of a linear):"]
    for dtype, by_copy in tuning["crossovers"].items():
        for copy, c in by_copy.items():
            panel = f", panel kernel M={c['panel'][0]}-{c['panel'][1]}" if c["panel"][1] else ""
            above = max(c["block_max"], c["panel"][1])
            lines.append(f"                 {dtype}, {'resident dense copy' if copy == 'resident' else 'no dense copy'}: "
                         f"block kernel M<={c['block_max']}{panel}, dense GEMM above M={above}")
    for kind, measured in sorted(tuning.get("kinds", {}).items()):
        parts = []
        for dtype, by_copy in measured["crossovers"].items():
            c = by_copy["resident"]
            parts.append(f"{dtype} block M<={c['block_max']}" + (f", panel to M={c['panel'][1]}" if c["panel"][1] else ""))
        lines.append(f"                 {kind} super-block kernel (resident dense copy): {'; '.join(parts)}")
    for dtype, limit in tuning.get("dense_kernel_rows", {}).items():
        lines.append(f"                 dense {dtype} weights: kiln's dense kernel M<={limit}, torch GEMM above"
                     if limit else f"                 dense {dtype} weights: torch GEMM at every M")
    if tuning.get("fp32_dense_copy") == "bfloat16":
        lines.append("                 fp32 models keep their dense copy in bf16 (prefill GEMMs in bf16: faster here; "
                     "the blocks stay exact for decode)")
    return lines


__all__ = ["ROWS", "DENSE_KERNEL_ROWS", "crossovers", "dense_kernel_limit", "describe", "copy_dtype", "cpu_identity", "dense_copy_dtype", "fingerprint", "limits", "load_tuning", "save", "tune_file"]
