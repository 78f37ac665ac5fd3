"""The memory peak of one model load, measured in a fresh process (tests/offload, benchmarks/weight_offload.py).

`measure_load_peak` runs `python -m kiln.loader.load_peak` in a new interpreter: it imports torch and kiln's
loader, loads the native kernels and pages in torch's vector math (code, the same for any model), resets the
process's peak resident set (`/proc/self/clear_refs` ← 5, Linux 4.0+), takes that resident set as the
baseline, loads the model once with `load_model`, and reports VmHWM − baseline: every byte the load itself
held at its worst moment (anonymous memory and the model file's pages mapped into the process; the page
cache outside the process is not counted, as it is reclaimable).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _probe(path: str, budget: int, streamed: bool, quantized_weights: str, directory: str,
           tokenizer_only: bool = False, dtype: str = "auto") -> dict[str, Any]:
    import torch

    from kiln.kernels.native import load_native
    from kiln.loader.model_loader import load_model
    from kiln.offload.weight_offload import WeightOffloadConfig, model_weight_tensors, unique_bytes

    import kiln.loader.gguf_lean  # noqa: F401 - code the load imports, in the baseline
    import kiln.loader.tokenizer  # noqa: F401
    import kiln.loader.streamed_load  # noqa: F401

    load_native()
    torch.arange(64, dtype=torch.float64).cos()  # torch's vector math library pages (RoPE tables need them)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = _status("VmRSS")
    if tokenizer_only:  # the vocabulary's share of a load: the lean header reader and the tokenizer it builds
        from kiln.loader.gguf_loader import open_gguf
        from kiln.loader.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(open_gguf(Path(path), lean=True))  # noqa: F841 - held, as a load holds it
        return {"baseline_bytes": baseline, "load_peak_bytes": _status("VmHWM") - baseline}
    config = WeightOffloadConfig(budget, Path(directory), streamed_load=streamed) if budget else None
    start = time.perf_counter()
    loaded = load_model(path, dtype=dtype, quantized_weights=quantized_weights, weight_offload=config)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    report = loaded.offload
    resident = report.resident_bytes if report else unique_bytes(model_weight_tensors(loaded.model))
    return {"baseline_bytes": baseline, "peak_bytes": peak, "load_peak_bytes": peak - baseline,
            "rss_after_load_bytes": _status("VmRSS") - baseline, "load_s": seconds, "streamed": streamed,
            "budget_bytes": budget, "weights_resident_bytes": resident,
            "weights_mapped_bytes": report.mapped_bytes if report else 0,
            "spilled_layers": len(report.spilled_layers) if report else 0,
            "largest_layer_bytes": _largest_layer(loaded.model)}


def _largest_layer(model: Any) -> int:
    from kiln.offload.weight_offload import linear_tensors

    return max((sum(t.numel() * t.element_size() for _, _, t in linear_tensors(layer)) for layer in model.layers),
               default=0)


def measure_load_peak(path: Path | str, budget: int = 0, streamed: bool = True, quantized_weights: str = "auto",
                      directory: Path | str = "/tmp", threads: int = 1, tokenizer_only: bool = False,
                      dtype: str = "auto") -> dict[str, Any]:
    """Run one load in a fresh interpreter and return its figures (see the module docstring); budget 0: none.
    `tokenizer_only`: read the header and build the tokenizer, no weights (the vocabulary's share of the peak)."""
    cmd = [sys.executable, "-m", "kiln.loader.load_peak", str(path), "--budget", str(budget),
           "--quantized-weights", quantized_weights, "--directory", str(directory), "--threads", str(threads),
           "--dtype", dtype]
    if not streamed:
        cmd.append("--eager")
    if tokenizer_only:
        cmd.append("--tokenizer-only")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Print one model load's memory peak as JSON (a fresh process).")
    parser.add_argument("path")
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--quantized-weights", default="auto")
    parser.add_argument("--directory", default="/tmp")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--eager", action="store_true", help="load fully, then move layers (the old path)")
    parser.add_argument("--tokenizer-only", action="store_true", help="header and tokenizer only, no weights")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(_probe(args.path, args.budget, not args.eager, args.quantized_weights, args.directory,
                            args.tokenizer_only, args.dtype)))


if __name__ == "__main__":
    main()
