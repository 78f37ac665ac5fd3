"""`kiln quantize`: from a loaded full-precision model to quantized layers, checked against a KL budget.

Steps: calibration windows (and disjoint held-out windows from the end of the same text) →
input statistics → each Linear quantized by the chosen method → optional sensitivity scan
(the KL each layer causes when quantized alone) used by --target-bits to keep the most sensitive
layers at 8 bits and by --max-kl to say which layers hurt → the layers installed in the model →
KL of the whole quantized model vs the original on the held-out windows → refuse when over --max-kl.

By default calibration uses the *original* model's activations for every layer (one pass).
With `sequential` (GPTQ and AWQ), each Linear is instead calibrated on the inputs the
already-quantized layers before it produce, block by block and sub-layer by sub-layer
(kiln.quantization.sequential): what the GPTQ paper does, and what lets GPTQ correct the error
earlier layers made; it costs about three forward passes over the calibration windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.eval.forward import window_logits
from kiln.kernels.dequant import dequantize_codes, fp8_dequantize
from kiln.layers.linear import Linear
from kiln.layers.quant_linear import method_for
from kiln.quantization.awq import awq_quantize
from kiln.quantization.calibration import (
    LayerStats, _progress, collect_stats, read_calibration_text, target_linears, token_windows,
)
from kiln.quantization.gptq import gptq_quantize
from kiln.quantization.primitives import IntScheme, fp8_quantize, group_qparams, pack_int4, quantize_codes
from kiln.quantization.sequential import sequential_quantize
from kiln.quantization.smoothquant import smooth_scales, w8a8_weight

METHODS = ("rtn", "gptq", "awq", "smoothquant", "fp8")
HELDOUT_WINDOWS = 4
HELDOUT_SEQLEN = 256


class QualityGateError(KilnError):
    """The quantized model is further from the original than --max-kl allows."""


@dataclass
class QuantizeOptions:
    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool | None = None  # None: symmetric at 8 bits, asymmetric (zero points) at 4
    damp: float = 0.01
    act_order: bool = True
    first_token_weight: float = 1.0  # GPTQ: position 0 (the attention sink) counts this many times in the Hessian
    sequential: bool = False  # GPTQ / AWQ: calibrate each layer on the quantized earlier layers' outputs
    clip: bool = False  # AWQ: also search a clip ratio per (row, group) (the paper's second step)
    alpha: float = 0.5
    calib_file: Path | str | None = None
    calib_samples: int = 64
    calib_seqlen: int = 512
    target_bits: float | None = None
    max_kl: float | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise KilnError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in ("smoothquant", "fp8") and self.bits != 8:
            raise KilnError(f"{self.method} is an 8-bit method; use --bits 8")
        if self.bits not in (4, 8):
            raise KilnError(f"--bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size not in (32, 64, 128, 256):
            raise KilnError(f"--group-size must be 32, 64, 128, 256 or -1 (per channel), got {self.group_size}")
        if self.target_bits is not None and not self.bits <= self.target_bits <= 8:
            raise KilnError(f"--target-bits must lie between --bits ({self.bits}) and 8, got {self.target_bits}")
        if self.sequential and self.method not in ("gptq", "awq"):
            raise KilnError(f"--sequential applies to gptq and awq, not {self.method}")
        if self.clip and self.method != "awq":
            raise KilnError(f"--clip applies to awq, not {self.method}")
        if self.first_token_weight < 1.0:
            raise KilnError(f"--first-token-weight must be at least 1, got {self.first_token_weight}")
        if self.max_kl is not None and self.max_kl <= 0:
            raise KilnError(f"--max-kl must be positive, got {self.max_kl}")

    def scheme(self, bits: int | None = None) -> IntScheme:
        b = bits or self.bits
        if b == 8:  # 8 bits: per output channel, symmetric, whatever the 4-bit group setting
            return IntScheme(8, -1, True if self.sym is None else self.sym)
        return IntScheme(4, self.group_size, False if self.sym is None else self.sym)


@dataclass
class LayerQuant:
    """One Linear's quantized tensors and its `quantization_config["layers"]` entry."""

    entry: dict
    tensors: dict[str, torch.Tensor]

    def effective_weight(self) -> torch.Tensor:
        """The fp32 weight this layer computes with (activation quantization aside)."""
        t, fmt = self.tensors, self.entry["format"]
        if fmt == "fp8":
            return fp8_dequantize(t["qweight"], t["scales"])
        if fmt == "w8a8":
            return t["qweight_t"].t().float() * t["scales"].unsqueeze(1) / t["smooth"].unsqueeze(0)
        codes = t["qweight"]
        if self.entry["bits"] == 4:
            from kiln.kernels.dequant import unpack_int4

            codes = unpack_int4(codes)
        w = dequantize_codes(codes, t["scales"].float(), t["qzeros"].float(), self.entry["group_size"])
        return w / t["smooth"].unsqueeze(0) if "smooth" in t else w

    @property
    def bits(self) -> int:
        return int(self.entry.get("bits", 8))


@dataclass
class QuantizeReport:
    layers: dict[str, LayerQuant]
    quantization_config: dict
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # (layer, KL alone), worst first


def quantize_layer(w: torch.Tensor, stats: LayerStats | None, opts: QuantizeOptions, bits: int,
                   frozen_rows: torch.Tensor | None = None) -> LayerQuant:
    """One Linear's weight w [N, K] → its quantized tensors; `frozen_rows` (bool [N]): rows AWQ's
    clip search leaves alone (query and key projections)."""
    method = opts.method
    if method == "fp8":
        q, scale = fp8_quantize(w)
        return LayerQuant({"format": "fp8", "bits": 8}, {"qweight": q, "scales": scale})
    if method == "smoothquant":
        assert stats is not None and stats.abs_max is not None
        s = smooth_scales(w, stats.abs_max, opts.alpha)
        qt, scale = w8a8_weight(w, s)
        return LayerQuant({"format": "w8a8", "bits": 8, "alpha": opts.alpha}, {"qweight_t": qt, "scales": scale, "smooth": s})
    scheme = opts.scheme(bits)
    extra: dict[str, torch.Tensor] = {}
    if method == "gptq":
        assert stats is not None
        codes, scale, zero = gptq_quantize(w, stats.mean_hessian(), scheme, opts.damp, opts.act_order)
    elif method == "awq":
        assert stats is not None
        codes, scale, zero, smooth, _ = awq_quantize(w, stats.sample_rows(), stats.absmean(), scheme,
                                                     clip=opts.clip, frozen_rows=frozen_rows)
        extra["smooth"] = smooth
    else:
        scale, zero = group_qparams(w, scheme)
        codes = quantize_codes(w, scale, zero, scheme)
    entry = {"format": "int", "bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym,
             "smooth": "smooth" in extra}
    tensors = {"qweight": pack_int4(codes) if scheme.bits == 4 else codes,
               "scales": scale.to(torch.float16), "qzeros": zero.to(torch.uint8), **extra}
    return LayerQuant(entry, tensors)


def install(model: nn.Module, layers: dict[str, LayerQuant]) -> None:
    """Switch each named Linear to its quantized method and load its tensors (the dense weight is dropped)."""
    for name, lq in layers.items():
        module = model.get_submodule(name)
        assert isinstance(module, Linear)
        module.set_method(method_for(lq.entry))
        for pname, tensor in lq.tensors.items():
            module.method.load_param(module, pname, tensor)


def kl_stats(ref_logprobs: list[torch.Tensor], logprobs: list[torch.Tensor]) -> tuple[float, float, float]:
    """(mean KL(ref‖q), p99 KL, top-1 agreement) over every position of every window."""
    kls, agree = [], []
    for r, q in zip(ref_logprobs, logprobs):
        kls.append((r.exp() * (r - q)).sum(-1))
        agree.append((r.argmax(-1) == q.argmax(-1)).float())
    kl = torch.cat(kls)
    return kl.mean().item(), torch.quantile(kl, 0.99).item(), torch.cat(agree).mean().item()


def _logprobs(model: nn.Module, windows: list[list[int]]) -> list[torch.Tensor]:
    return [torch.log_softmax(window_logits(model, w), -1) for w in windows]


def sensitivity_scan(model: nn.Module, layers: dict[str, LayerQuant], windows: list[list[int]],
                     ref: list[torch.Tensor], progress: bool) -> list[tuple[str, float]]:
    """KL each layer causes when it alone computes with its quantized weight (swapped in, then restored)."""
    out = []
    for name in _progress(list(layers), "sensitivity", progress, "layer"):
        module = model.get_submodule(name)
        original = module.weight.data
        module.weight.data = layers[name].effective_weight().to(original.dtype)
        try:
            out.append((name, kl_stats(ref, _logprobs(model, windows))[0]))
        finally:
            module.weight.data = original
    return sorted(out, key=lambda t: -t[1])


def choose_mixed_bits(model: nn.Module, sensitivity: list[tuple[str, float]], low: int, target: float) -> set[str]:
    """Most sensitive layers first, promote to 8 bits while the parameter-weighted mean stays ≤ target."""
    sizes = {name: m.input_size * sum(m.output_sizes) for name, m in target_linears(model).items()}
    total = sum(sizes.values())
    bits_sum = low * total
    promoted: set[str] = set()
    for name, _ in sensitivity:
        extra = (8 - low) * sizes[name]
        if (bits_sum + extra) / total > target + 1e-9:
            continue
        bits_sum += extra
        promoted.add(name)
    return promoted


def quantize_model(model: nn.Module, tokenizer: "object", opts: QuantizeOptions) -> QuantizeReport:
    """Quantize `model` in place (full precision in, quantized Linears out) and report its KL.

    Raises QualityGateError, naming the worst layers, when the result exceeds `opts.max_kl`;
    the model is then left quantized but nothing has been saved.
    """
    opts.validate()
    text = read_calibration_text(opts.calib_file)
    ids = tokenizer.encode(text, add_special_tokens=False)
    heldout_tokens = HELDOUT_WINDOWS * HELDOUT_SEQLEN
    if len(ids) < heldout_tokens + opts.calib_seqlen:
        raise KilnError(f"calibration text has {len(ids)} tokens; it needs at least {heldout_tokens + opts.calib_seqlen}")
    calib = token_windows(ids, opts.calib_samples, opts.calib_seqlen, stop=len(ids) - heldout_tokens)
    heldout = token_windows(ids, HELDOUT_WINDOWS, HELDOUT_SEQLEN, start=len(ids) - heldout_tokens)
    ref = _logprobs(model, heldout)

    needs = {"gptq": {"hessian": True}, "awq": {"absmean": True}, "smoothquant": {"absmax": True}}.get(opts.method)
    linears = target_linears(model)
    frozen = {name: _qk_rows(m) for name, m in linears.items()}
    layers: dict[str, LayerQuant] = {}
    if opts.sequential:
        def quantize_one(name: str, w: torch.Tensor, st: LayerStats) -> torch.Tensor:
            layers[name] = quantize_layer(w, st, opts, opts.bits, frozen[name])
            return layers[name].effective_weight()

        stats = sequential_quantize(model, calib, quantize_one, progress=opts.progress,
                                    first_token_weight=opts.first_token_weight, **(needs or {}))
    else:
        stats = collect_stats(model, calib, progress=opts.progress, first_token_weight=opts.first_token_weight,
                              **needs) if needs else {}
        for name in _progress(list(linears), f"{opts.method} int{opts.bits}", opts.progress, "layer"):
            layers[name] = quantize_layer(linears[name].weight.data.float(), stats.get(name), opts, opts.bits, frozen[name])
    sensitivity: list[tuple[str, float]] = []
    if opts.target_bits is not None or opts.max_kl is not None:
        sensitivity = sensitivity_scan(model, layers, heldout[:2], ref[:2], opts.progress)
    if opts.target_bits is not None and opts.bits < 8:
        for name in choose_mixed_bits(model, sensitivity, opts.bits, opts.target_bits):
            layers[name] = quantize_layer(linears[name].weight.data.float(), stats.get(name), opts, 8, frozen[name])
    stats.clear()

    sizes = {name: m.input_size * sum(m.output_sizes) for name, m in linears.items()}
    install(model, layers)
    kl_mean, kl_p99, top1 = kl_stats(ref, _logprobs(model, heldout))
    config = quantization_config(opts, layers, sizes, kl_mean)
    report = QuantizeReport(layers, config, kl_mean, kl_p99, top1, sensitivity)
    if opts.max_kl is not None and kl_mean > opts.max_kl:
        worst = ", ".join(f"{n} ({k:.4f})" for n, k in sensitivity[:5])
        raise QualityGateError(
            f"quantized model's mean KL vs the original is {kl_mean:.4f} > --max-kl {opts.max_kl} (held-out calibration "
            f"text); the layers that hurt most alone: {worst}. Keep them at 8 bits with --target-bits, use more bits, "
            "a smaller group, or another method. Nothing was saved.")
    return report


def _qk_rows(linear: Linear) -> torch.Tensor:
    """bool [N]: the rows of a fused projection that belong to its "q" or "k" shard."""
    rows = torch.zeros(sum(linear.output_sizes), dtype=torch.bool)
    for shard in linear.shard_names:
        if shard in ("q", "k"):
            rows[linear.shard_slice(shard)] = True
    return rows


def quantization_config(opts: QuantizeOptions, layers: dict[str, LayerQuant], sizes: dict[str, int],
                        kl_mean: float) -> dict:
    """The documented `quantization_config` block of config.json (see kiln.quantization.checkpoint)."""
    mean_bits = sum(layers[n].bits * s for n, s in sizes.items()) / max(sum(sizes.values()), 1)
    return {
        "quant_method": "kiln",
        "format_version": 1,
        "method": opts.method,
        "bits": opts.bits,
        "group_size": opts.group_size if opts.bits == 4 else -1,
        "sym": opts.scheme().sym,
        **({"sequential": True} if opts.sequential else {}),
        **({"clip": True} if opts.clip else {}),
        **({"first_token_weight": opts.first_token_weight} if opts.first_token_weight != 1.0 else {}),
        "mean_bits": round(mean_bits, 3),
        "calibration": {"file": Path(opts.calib_file).name if opts.calib_file else "pride_and_prejudice_pg1342.txt",
                        "samples": opts.calib_samples, "seqlen": opts.calib_seqlen},
        "heldout_kl_mean": round(kl_mean, 6),
        "layers": {f"model.{n}": lq.entry for n, lq in layers.items()},
    }
