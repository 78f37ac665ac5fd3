"""`kiln plan --calibrate`: a short measurement of this machine that the speed predictions stand on.

What is measured (each a low percentile of repeats, on the engine's thread count: see `low`):
- read bandwidth (a large fp32 sum): what decode attention's KV reads stream at;
- per decode kernel path (the GGUF blocks through kiln's native kernels; dense fp32; dense bf16), engine
  decode steps of the default model at 1, 2 and 8 sequences (1, 2, 4, 8 and 12 on the native fp32 path,
  whose block and panel kernels are two regimes): the forward's time less its KV reads, per byte of
  weights the step streams ("seconds per byte": the path's effective bandwidth, kernels and per-layer
  work included), and the step's time outside the forward (scheduling, sampling, outputs). Predictions
  interpolate between the measured batches and extend the last segment beyond them;
- engine prefills with a 256-token step budget: first chunks of 128 and 256 tokens give the cost per
  token (per linear parameter); the second 256-token chunk of a 512-token prompt, less the first, gives
  the cost of attending to an earlier chunk (per token pair, layer and query width). See `_prefill_fit`.

Micro-benchmarks of single GEMV calls from Python were tried first and dropped: on a shared 2-core CPU
they stalled for seconds where the fused native decode step did not, so the decode figures come from
the engine's own steps. Of the settings the README checks predictions at, single-stream decode is a
calibrated batch (in sample); 16 sequences (beyond the last measured batch) and the 1,024-token prefill
in 512-token chunks (twice the measured chunk and prefix) are out of sample. An earlier version left
batch 1 out and extrapolated a line from 2 and 4 sequences down to it: the native path's single-stream
decode then came out 0.72x the prediction, because one row streams the blocks at a lower rate than that
line implies. Cached in $KILN_HOME/calibration/<machine key>.json; the key names the CPU, threads, torch,
device and kernel path.
"""

from __future__ import annotations

from kiln.kernels.tune import low  # noqa: F401 (re-exported: the planner's and `kiln tune`'s one statistic)

import hashlib
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFILL_CHUNK = 256  # the calibration engine's step budget: prompts above it prefill in chunks of this size
PREFILL_LENGTHS = (128, PREFILL_CHUNK)  # first chunks: the cost per token
VERSION = 7
_FRESH = itertools.count(1)  # first-token offsets that keep calibration prompts out of the prefix cache


def cpu_name() -> str:
    from kiln.kernels.tune import cpu_identity

    name = cpu_identity()[0]
    return name if name != "unknown" else platform.processor() or platform.machine()


def machine_key(threads: int, device: str = "cpu") -> dict[str, Any]:
    """What a calibration is valid for: a different CPU, thread count, torch or kernel build recalibrates."""
    import torch

    from kiln.kernels.native import load_native

    from kiln.kernels.tune import load_tuning

    tuning = load_tuning(threads)  # `kiln tune` changes which kernels the engine runs: a new tuning recalibrates
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "device": device, "native_kernels": bool(load_native()),
            "kernel_march": os.environ.get("KILN_KERNEL_MARCH", "native"), "version": VERSION,
            "kernel_tuning": tuning["date"] if tuning else None}


def cache_file(key: dict[str, Any]) -> Path:
    from kiln.hub import kiln_home

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return kiln_home() / "calibration" / f"{digest}.json"


def load_calibration(threads: int, device: str = "cpu") -> dict[str, Any] | None:
    path = cache_file(machine_key(threads, device))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None




def _low_time(fn: Callable[[], None], repeats: int) -> float:
    """`low` of `repeats` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return low(times)


def read_bandwidth_gb_s() -> float:
    import torch

    x = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB: far above any cache
    return x.numel() * 4 / _low_time(lambda: x.sum(), 6) / 1e9


def _timed_forward(model: Any) -> tuple[Callable[[], float], Callable[[], None]]:
    """Hooks that add up the model's forward time; (read total, remove hooks)."""
    state = {"t0": 0.0, "total": 0.0}
    pre = model.register_forward_pre_hook(lambda *_: state.__setitem__("t0", time.perf_counter()))
    post = model.register_forward_hook(lambda *_: state.__setitem__("total", state["total"] + time.perf_counter() - state["t0"]))

    def remove() -> None:
        pre.remove()
        post.remove()
    return (lambda: state["total"]), remove


def engine_decode(engine: Any, batch: int, steps: int, prompt: list[int]) -> tuple[list[float], list[float]]:
    """(step seconds, forward seconds) of each of `steps` pure decode steps of `batch` sequences."""
    from kiln.sampling_params import SamplingParams

    budget = engine.scheduler_config.max_num_batched_tokens
    warm = -(-batch * len(prompt) // budget) + 2  # the prompts' prefill chunks, then a first decode step
    # room for every timed step even for a request whose prefill finished in the first warm-up step
    params = SamplingParams(temperature=0, max_tokens=warm + steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request({"prompt_token_ids": [prompt[0] + i % 7, *prompt[1:]]}, params)
    for _ in range(warm):
        engine.step()
    total, remove = _timed_forward(engine.loaded.model)
    steps_s, fwd_s = [], []
    try:
        for _ in range(steps):
            f0, t0 = total(), time.perf_counter()
            engine.step()
            steps_s.append(time.perf_counter() - t0)
            fwd_s.append(total() - f0)
    finally:
        remove()
        while engine.has_unfinished_requests():
            engine.step()
    return steps_s, fwd_s


def engine_prefill(engine: Any, prompt: list[int]) -> list[tuple[float, float]]:
    """(step seconds, forward seconds) of each prefill chunk of `prompt` (one per step of the engine's budget)."""
    from kiln.sampling_params import SamplingParams

    total, remove = _timed_forward(engine.loaded.model)
    # a first token no earlier call used: otherwise the prefix cache serves the prompt and nothing is prefilled
    engine.add_request({"prompt_token_ids": [prompt[0] + next(_FRESH), *prompt[1:]]},
                       SamplingParams(temperature=0, max_tokens=1))
    chunks = []
    try:
        while engine.has_unfinished_requests():
            f0, t0 = total(), time.perf_counter()
            engine.step()
            chunks.append((time.perf_counter() - t0, total() - f0))
    finally:
        remove()
    return chunks


def _fit(xs: tuple[int, int], ys: tuple[float, float]) -> tuple[float, float]:
    """(intercept, slope) through two points, slope clamped at >= 0 (more sequences never cost less)."""
    slope = max(0.0, (ys[1] - ys[0]) / (xs[1] - xs[0]))
    return max(0.0, ys[0] - slope * xs[0]), slope


# The kernel paths a decode step can take, and the engine options that select each on the default model.
PATHS = {"native_block": {}, "float32": {"quantized_weights": "dequantize", "dtype": "float32"},
         "bfloat16": {"quantized_weights": "dequantize", "dtype": "bfloat16"}}


def step_bytes(on_disk: dict[str, int], params: int, head_params: int, path: str) -> int:
    """Weight bytes one decode step streams on `path`: the GGUF blocks, or dense copies in the activation dtype."""
    if path == "native_block":
        return on_disk["attention"] + on_disk["mlp"] + on_disk["embeddings"] + on_disk["lm_head"]
    return (params + head_params) * (4 if path == "float32" else 2)


def _decode_path(model: str, path: str, threads: int, prompt: list[int], read_bps: float, arch: Any,
                 weight_bytes: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds per streamed weight byte and the engine's fixed step cost at 2 and 8 sequences, on one path."""
    from kiln.engine.arg_utils import EngineArgs
    from kiln.engine.llm_engine import LLMEngine
    from kiln.planner.memory import PlanRequest, kv_cache

    log(f"decode steps, {path} path ...")
    # One decode step per engine step: the calibration times single steps and their forwards (a
    # multi-step trip would run several, outside the model's forward); predictions are per step, so the
    # Python time trips save on top (~10 % of a single-stream step here) is not counted: pessimistic.
    engine = LLMEngine.from_engine_args(EngineArgs.from_kwargs(
        model=model, threads=threads, kv_cache_memory="256MiB", max_num_batched_tokens=PREFILL_CHUNK,
        num_scheduler_steps=1, **PATHS[path]))
    act = "float32" if engine.loaded.model.dtype == __import__("torch").float32 else "bfloat16"
    kv_token = kv_cache(arch, PlanRequest(context=1, block_size=1, activation_dtype=act), 1)[1]
    # kiln switches kernels by rows: fp32 activations run the block kernel, then the panel kernel (built-in:
    # from 6 rows; `kiln tune` may move or drop it), so each regime gets its own batches (a line across the
    # switch misfits both)
    from kiln.planner.predict import first_panel_row

    first_panel = first_panel_row() if path == "native_block" and act == "float32" else None
    panel = first_panel is not None and first_panel <= 8
    batches = (1, 2, 4, 8, 12) if path == "native_block" and act == "float32" else (1, 2, 8)
    samples: dict[int, tuple[list[float], list[float]]] = {b: ([], []) for b in batches}
    for _ in range(3):  # rounds that alternate the batches: a busy minute on the machine hits all alike
        for b, (steps_s, fwd_s) in samples.items():
            more_steps, more_fwd = engine_decode(engine, b, 6, prompt)
            steps_s += more_steps
            fwd_s += more_fwd
    per_byte, fixed = {}, {}
    for b, (steps_s, fwd_s) in samples.items():
        step, fwd = low(steps_s), low(fwd_s)
        kv_s = b * (len(prompt) + 8) * kv_token / read_bps  # the measured steps' mean context
        per_byte[b] = max(fwd - kv_s, 1e-6) / weight_bytes
        fixed[b] = max(0.0, step - fwd)
    lo, hi = (2, 4) if panel else (2, 8)
    out = {"weight_bytes": weight_bytes, "act_dtype": act, "decode_path": engine.loaded.model.decode_plan_status,
           "s_per_byte": _fit((lo, hi), (per_byte[lo], per_byte[hi])), "fixed_s": _fit((lo, hi), (fixed[lo], fixed[hi])),
           "measured_batches": {str(b): {"s_per_byte": per_byte[b], "outside_forward_s": fixed[b]} for b in batches}}
    if panel:
        out["panel_from_rows"] = first_panel
        out["panel_s_per_byte"] = _fit((8, 12), (per_byte[8], per_byte[12]))
        out["panel_fixed_s"] = _fit((8, 12), (fixed[8], fixed[12]))
    # fp32 prefill is the native path's (its blocks prefill through the dense fp32 copy) unless `kiln tune`
    # keeps that copy in bf16 here: then the dense fp32 model's own prefill is measured too
    from kiln.planner.predict import dense_copy_path

    if path != "float32" or dense_copy_path("float32") != "float32":
        log(f"prefill, {path} path ...")
        out["prefill"] = _prefill_fit(engine, prompt, arch)
    return out


def _prefill_fit(engine: Any, prompt: list[int], arch: Any) -> dict[str, Any]:
    """Engine prefills under a PREFILL_CHUNK-token step budget → the cost per token and linear parameter
    (first chunks of PREFILL_LENGTHS tokens, least squares through the step's fixed cost) and the cost per
    token pair, layer and query width of attending to an earlier chunk (a 2 x PREFILL_CHUNK prompt's second
    chunk less its first). Both are per shape, so they carry over to another model's sizes.

    An earlier fit put all growth of the per-token cost between 128 and 512 tokens into a T^2 attention
    term; it predicted a 1,024-token prefill at 0.69x what the engine measured, because the engine prefills
    a long prompt in budget-sized chunks whose cost per token barely grows. Measured here (AMD EPYC, 2
    threads, 2026-11-30): first chunks of 128, 256 and 512 tokens at 647, 718 and 737 tok/s; a second
    512-token chunk after 512 costs 130 ms more than the first."""
    h, f, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_size, arch.kv_size
    params = arch.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * f)
    firsts: dict[int, list[tuple[float, float]]] = {n: [] for n in PREFILL_LENGTHS}
    seconds: list[tuple[float, float]] = []  # the 2-chunk prompt's second chunk: (step, forward)
    for _ in range(3):  # alternating lengths, as the decode batches
        for n in PREFILL_LENGTHS:
            firsts[n].append(engine_prefill(engine, (prompt * (n // len(prompt) + 1))[:n])[0])
        two = engine_prefill(engine, (prompt * (2 * PREFILL_CHUNK // len(prompt) + 1))[:2 * PREFILL_CHUNK])
        firsts[PREFILL_CHUNK].append(two[0])  # a first chunk like any other
        seconds.append(two[1])
    fwd = {n: low([f_ for _, f_ in runs]) for n, runs in firsts.items()}
    fixed = low([t - f_ for runs in firsts.values() for t, f_ in runs] + [t - f_ for t, f_ in seconds])
    per_token = sum(fwd[n] * n for n in fwd) / sum(n * n for n in fwd)  # least squares through the origin
    # low() of each side, then the difference: the low of noisy differences would pick the luckiest pair
    cross = max(0.0, low([f_ for _, f_ in seconds]) - fwd[PREFILL_CHUNK])
    return {"s_per_token_param": per_token / params,
            "s_per_token_pair_layer_q": cross / (PREFILL_CHUNK * PREFILL_CHUNK * arch.num_layers * q),
            "fixed_s": fixed, "chunk_tokens": PREFILL_CHUNK,
            "measured": {**{str(n): fwd[n] for n in fwd}, f"second_{PREFILL_CHUNK}_extra": cross}}


def calibrate(threads: int = 2, model: str = "smollm2-135m", log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure this machine (a few minutes on a busy 2-core CPU) and cache the result; returns the calibration."""
    import torch

    from kiln.planner.memory import weights_from_tensors
    from kiln.planner.sources import resolve_source

    torch.set_num_threads(threads)
    key = machine_key(threads)
    source = resolve_source(model)
    arch = source.arch
    on_disk = weights_from_tensors(source.tensors)
    h, f, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_size, arch.kv_size
    shapes = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)] * arch.num_layers
    params = sum(n * k for n, k in shapes)
    log("read bandwidth ...")
    read = read_bandwidth_gb_s() * 1e9
    prompt = _prompt(model, "The history of the printing press begins in " * 6)
    paths: dict[str, Any] = {}
    for path in PATHS:
        entry = _decode_path(model, path, threads, prompt, read, arch, step_bytes(on_disk, params, arch.vocab_size * h, path), log)
        paths[path] = entry
    paths["float32"].setdefault("prefill", paths["native_block"]["prefill"])
    cal = {"machine": key, "date": time.strftime("%Y-%m-%d %H:%M"), "calibration_model": model,
           "read_bytes_per_s": read, "paths": paths}
    path_file = cache_file(key)
    path_file.parent.mkdir(parents=True, exist_ok=True)
    path_file.write_text(json.dumps(cal, indent=1))
    return cal


_PROMPTS: dict[str, list[int]] = {}


def _prompt(model: str, text: str) -> list[int]:
    """48 tokens of `text` in the model's tokenizer (loaded once)."""
    if model not in _PROMPTS:
        from kiln.hub import resolve_model
        from kiln.loader.tokenizer import Tokenizer

        path = resolve_model(model)
        tok = Tokenizer.from_gguf(path) if str(path).endswith(".gguf") else Tokenizer.from_hf_dir(path)
        _PROMPTS[model] = tok.encode(text)[:48]
    return _PROMPTS[model]
