"""`kiln plan --calibrate`: a short measurement of this machine that the speed predictions stand on.

What is measured (each the median of a few repeats, on the engine's thread count):
- read bandwidth (a large fp32 sum): what decode attention's KV reads stream at;
- per kernel path, the time of every decoder linear layer of the default model at M = 1..16 rows
  (bytes/s: decode) and at M = 256 (FLOP/s: prefill). The native path runs the GGUF's Q4_1 blocks through
  kiln's block kernels; the dense paths run torch's fp32 / bf16 GEMM on weights of the same shapes, so
  the figures carry over to any model whose layers stream from memory the same way;
- the LM head (Q8_0 tied blocks on the native path, dense otherwise);
- per-step overhead, by path (the fused native decode step and the op-by-op Python path): an engine
  step's time minus its forward (the engine, sampling, the LM head) and the forward's time minus its
  linear layers and KV reads (norms, RoPE, attention over a short context, dispatch), at 2 and 8
  sequences, fitted linearly in the batch; and prefill attention's FLOP/s from a 256-token prefill.

The overheads are measured on the default model at settings (2 and 8 sequences, a 256-token prefill)
that differ from those the README checks predictions at (1 and 16 sequences, 1,024 tokens). Cached in
$KILN_HOME/calibration/<machine key>.json; the key names the CPU, threads, torch, device and kernel path.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CAL_BATCHES = (1, 2, 4, 8, 16, 32)
PREFILL_ROWS = 256
VERSION = 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int, device: str = "cpu") -> dict[str, Any]:
    """What a calibration is valid for: a different CPU, thread count, torch or kernel build recalibrates."""
    import torch

    from kiln.kernels.native import load_native

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "device": device, "native_kernels": bool(load_native()),
            "kernel_march": os.environ.get("KILN_KERNEL_MARCH", "native"), "version": VERSION}


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


def _median(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up. The median, like the engine measurements it
    is compared with: on a shared CPU the best call is luckier than a run of engine steps ever is."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth_gb_s() -> float:
    import torch

    x = torch.ones(64 << 20, dtype=torch.float32)  # 256 MiB: far above any cache
    return x.numel() * 4 / _median(lambda: x.sum(), 6) / 1e9


def _linears(model: Any) -> list[Any]:
    return [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                  layer.mlp.gate_up_proj, layer.mlp.down_proj)]


def _shapes(model: Any) -> list[tuple[int, int]]:
    """(out, in) of every decoder linear, in order."""
    return [(sum(m.output_sizes), m.input_size) for m in _linears(model)]


def time_pass(layers: list[Callable[[Any], Any]], in_sizes: list[int], rows: int, dtype: Any, repeats: int) -> float:
    """Seconds for one pass over `layers` with `rows` activation rows each (each layer streams its weight)."""
    import torch

    xs = {k: torch.randn(rows, k, dtype=dtype) for k in set(in_sizes)}

    def run() -> None:
        with torch.inference_mode():
            for f, k in zip(layers, in_sizes):
                f(xs[k])
    return _median(run, repeats)


def _dense_layers(shapes: list[tuple[int, int]], dtype: Any) -> list[Callable[[Any], Any]]:
    import torch

    ws = [torch.randn(n, k, dtype=dtype) * 0.02 for n, k in shapes]
    return [lambda x, w=w: torch.nn.functional.linear(x, w) for w in ws]


def _timed_forward(model: Any) -> tuple[Callable[[], float], Callable[[], None]]:
    """Hooks that add up the model's forward time; (read total, remove hooks)."""
    state = {"t0": 0.0, "total": 0.0}
    pre = model.register_forward_pre_hook(lambda *_: state.__setitem__("t0", time.perf_counter()))
    post = model.register_forward_hook(lambda *_: state.__setitem__("total", state["total"] + time.perf_counter() - state["t0"]))

    def remove() -> None:
        pre.remove()
        post.remove()
    return (lambda: state["total"]), remove


def engine_decode(engine: Any, batch: int, steps: int, prompt: list[int]) -> tuple[float, float]:
    """(step seconds, forward seconds) per pure decode step of `batch` sequences (median of `steps`)."""
    from kiln.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request({"prompt_token_ids": [prompt[0] + i % 7, *prompt[1:]]}, params)
    for _ in range(3):  # prefill and the first decode steps
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
    return statistics.median(steps_s), statistics.median(fwd_s)


def engine_prefill(engine: Any, prompt: list[int], repeats: int = 3) -> tuple[float, float]:
    """(step seconds, forward seconds) of one prefill chunk of len(prompt) tokens (the median run of `repeats`)."""
    from kiln.sampling_params import SamplingParams

    runs = []
    for i in range(repeats):
        total, remove = _timed_forward(engine.loaded.model)
        engine.add_request({"prompt_token_ids": [prompt[0] + i, *prompt[1:]]}, SamplingParams(temperature=0, max_tokens=1))
        t0 = time.perf_counter()
        engine.step()
        runs.append((time.perf_counter() - t0, total()))
        remove()
        while engine.has_unfinished_requests():
            engine.step()
    runs.sort()
    return runs[len(runs) // 2]


def _fit(xs: tuple[int, int], ys: tuple[float, float]) -> tuple[float, float]:
    """(intercept, slope) through two points, slope clamped at >= 0 (more sequences never cost less)."""
    slope = max(0.0, (ys[1] - ys[0]) / (xs[1] - xs[0]))
    return max(0.0, ys[0] - slope * xs[0]), slope


def _path_rates(layers: list[Callable[[Any], Any]], shapes: list[tuple[int, int]], weight_bytes: int,
                dtype: Any) -> dict[str, Any]:
    """bytes/s of one decode pass over the layers at each batch in CAL_BATCHES, FLOP/s at PREFILL_ROWS."""
    ins = [k for _, k in shapes]
    params = sum(n * k for n, k in shapes)
    decode = {str(m): weight_bytes / time_pass(layers, ins, m, dtype, 5) for m in CAL_BATCHES}
    prefill = 2 * params * PREFILL_ROWS / time_pass(layers, ins, PREFILL_ROWS, dtype, 3)
    return {"weight_bytes": weight_bytes, "decode_bytes_per_s": decode, "prefill_flops_per_s": prefill}


def _head_rates(model: Any, dtype: Any, head_bytes: int) -> dict[str, float]:
    """bytes/s of the LM head (compute_logits, fp32 logits out) at each batch."""
    import torch

    out = {}
    for m in CAL_BATCHES:
        x = torch.randn(m, model.config.hidden_size, dtype=dtype)
        with torch.inference_mode():
            out[str(m)] = head_bytes / _median(lambda: model.compute_logits(x), 5)
    return out


def _overheads(engine: Any, linear_s: Callable[[int], float], head_s: Callable[[int], float], kv_token_bytes: int,
               read_bps: float, prompt: list[int], layers: int) -> dict[str, Any]:
    """Per-step overhead at 2 and 8 sequences, fitted in the batch: engine (step - forward - head) and
    per layer (forward - linears - KV reads) / layers."""
    fixed, per_layer = [], []
    for b in (2, 8):
        step, fwd = engine_decode(engine, b, 10, prompt)
        ctx = len(prompt) + 8  # the mean context of the measured steps
        kv_s = b * ctx * kv_token_bytes / read_bps
        fixed.append(max(0.0, step - fwd - head_s(b)))
        per_layer.append(max(0.0, fwd - linear_s(b) - kv_s) / layers)
    return {"fixed_s": _fit((2, 8), tuple(fixed)), "per_layer_s": _fit((2, 8), tuple(per_layer))}


def calibrate(threads: int = 2, model: str = "smollm2-135m", log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure this machine (about a minute) and cache the result; returns the calibration."""
    import torch

    from kiln.engine.arg_utils import EngineArgs
    from kiln.engine.llm_engine import LLMEngine
    from kiln.planner.memory import PlanRequest, kv_cache, weights_from_tensors
    from kiln.planner.sources import resolve_source

    torch.set_num_threads(threads)
    key = machine_key(threads)
    source = resolve_source(model)
    on_disk = weights_from_tensors(source.tensors)
    log("read bandwidth ...")
    read = read_bandwidth_gb_s() * 1e9
    engine = LLMEngine.from_engine_args(EngineArgs.from_kwargs(
        model=model, threads=threads, kv_cache_memory="512MiB", max_num_batched_tokens=PREFILL_ROWS + 64))
    net = engine.loaded.model
    shapes = _shapes(net)
    paths: dict[str, Any] = {}
    log("native block kernels ...")
    native = _path_rates(list(_linears(net)), shapes, on_disk["attention"] + on_disk["mlp"], net.dtype)
    paths["native_block"] = {**native, "act_dtype": str(net.dtype).removeprefix("torch."),
                             "source_type": "q4_1", "head_decode_bytes_per_s": _head_rates(net, net.dtype, on_disk["embeddings"])}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        log(f"dense {name} GEMM ...")
        size = torch.empty((), dtype=dtype).element_size()
        paths[name] = _path_rates(_dense_layers(shapes, dtype), shapes, sum(n * k for n, k in shapes) * size, dtype)
    kv_token = kv_cache(source.arch, PlanRequest(context=1, block_size=1), 1)[1]
    head_bytes = on_disk["embeddings"]
    rates = paths["native_block"]

    def linear_s(b: int) -> float:
        return rates["weight_bytes"] / rates["decode_bytes_per_s"][str(b)]

    def head_s(b: int) -> float:
        return head_bytes / rates["head_decode_bytes_per_s"][str(b)]

    prompt = engine.tokenizer.encode("The history of the printing press begins in " * 6)[:48]
    layers = source.arch.num_layers
    log("engine overheads (fused decode step, op-by-op path) ...")
    over = {"fused": _overheads(engine, linear_s, head_s, kv_token, read, prompt, layers)}
    net.fused_decode_step = False
    over["plain"] = _overheads(engine, linear_s, head_s, kv_token, read, prompt, layers)
    net.fused_decode_step = True
    log("prefill attention ...")
    long_prompt = (prompt * (PREFILL_ROWS // len(prompt) + 1))[:PREFILL_ROWS]
    step, fwd = engine_prefill(engine, long_prompt)
    linear_prefill = 2 * sum(n * k for n, k in shapes) * PREFILL_ROWS / rates["prefill_flops_per_s"]
    attn_flops = attention_prefill_flops(source.arch.num_layers, source.arch.q_size, PREFILL_ROWS)
    cal = {"machine": key, "date": time.strftime("%Y-%m-%d %H:%M"), "calibration_model": model,
           "read_bytes_per_s": read, "paths": paths, "overhead": over,
           "prefill": {"step_s": step, "forward_s": fwd, "linear_s": linear_prefill,
                       "attention_flops_per_s": attn_flops / max(fwd - linear_prefill, 1e-4),
                       "fixed_s": max(0.0, step - fwd)}}
    path = cache_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal, indent=1))
    return cal


def attention_prefill_flops(layers: int, q_size: int, tokens: int, prefix: int = 0) -> float:
    """Causal attention of `tokens` new tokens after `prefix` cached ones: QK^T and PV, 2 FLOPs a MAC."""
    pairs = tokens * prefix + tokens * (tokens + 1) / 2
    return 4.0 * layers * q_size * pairs
