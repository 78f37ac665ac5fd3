"""Sequential calibration (each Linear on the quantized earlier layers' outputs), AWQ's clip search and
GPTQ's first-token Hessian weight: what each promises, on random weights and a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.eval.forward import window_logits
from kiln.kernels.dequant import dequantize_codes
from kiln.loader.model_loader import load_model
from kiln.quantization.awq import awq_quantize
from kiln.quantization.awq_clip import CLIP_RATIOS, clip_weight, search_clip
from kiln.quantization.calibration import LayerStats, accumulate, target_linears
from kiln.quantization.primitives import IntScheme, fake_quantize, group_qparams
from kiln.quantization.quantize import QuantizeOptions, quantize_model
from kiln.quantization.sequential import sequential_quantize

from loader.tiny_model import TinyModels



def test_sequential_sees_each_linear_after_the_ones_before_are_quantized(tiny: TinyModels) -> None:
    loaded = load_model(tiny.hf["untied"], dtype="float32")
    model = loaded.model
    originals = {n: m.weight.data.clone() for n, m in target_linears(model).items()}
    order: list[str] = []
    seen_quantized: dict[str, set[str]] = {}

    def quantize(name: str, w: torch.Tensor, st: LayerStats) -> torch.Tensor:
        assert st.rows == 2 * 48 and st.hessian is not None  # every window, every position, once
        # every Linear quantized so far computes with its quantized weight right now
        seen_quantized[name] = {n for n in order
                                if not torch.equal(model.get_submodule(n).weight.data, originals[n])}
        order.append(name)
        return fake_quantize(w, IntScheme(4, 32, False))

    windows = [list(range(3, 51)), list(range(60, 108))]
    sequential_quantize(model, windows, quantize, hessian=True, progress=False)
    per_block = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    assert order == [f"layers.{i}.{leaf}" for i in range(2) for leaf in per_block]
    for i, name in enumerate(order):
        assert seen_quantized[name] == set(order[:i])
    for n, m in target_linears(model).items():  # the caller installs the quantized layers; weights are restored
        assert torch.equal(m.weight.data, originals[n])


def test_sequential_stats_of_the_first_linear_match_one_pass(tiny: TinyModels) -> None:
    """Nothing is quantized before layers.0's qkv_proj: its Hessian is the one-pass one."""
    from kiln.quantization.calibration import collect_stats

    model = load_model(tiny.hf["untied"], dtype="float32").model
    windows = [list(range(3, 51))]
    one_pass = collect_stats(model, windows, hessian=True, progress=False)
    got = sequential_quantize(model, windows, lambda n, w, st: w, hessian=True, progress=False)
    for name in one_pass:  # quantizing nothing: every Linear's inputs are the original model's
        torch.testing.assert_close(got[name].hessian, one_pass[name].hessian, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,extra", [("gptq", {"sequential": True, "first_token_weight": 64.0}),
                                          ("awq", {"sequential": True, "clip": True})])
def test_sequential_methods_quantize_a_tiny_model(tiny: TinyModels, calib_file: Path, method: str, extra: dict) -> None:
    loaded = load_model(tiny.hf["untied"], dtype="float32")
    ids = list(range(3, 40))
    before = window_logits(loaded.model, ids)
    opts = QuantizeOptions(method=method, bits=4, group_size=32, calib_file=calib_file, calib_samples=2, calib_seqlen=64,
                           progress=False, **extra)
    report = quantize_model(loaded.model, loaded.tokenizer, opts)
    assert report.kl_mean < 0.5 and not torch.equal(before, window_logits(loaded.model, ids))
    assert report.quantization_config["sequential"] is True


def test_clip_search_never_worse_than_no_clip() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    w[:, 3] *= 20  # outliers a clip can trade away
    x = torch.randn(256, 128, generator=g)
    scheme = IntScheme(4, 32, False)
    ratio = search_clip(w, x, scheme)
    grid = torch.tensor(CLIP_RATIOS)
    assert ratio.shape == (64, 4) and all((grid - r).abs().min() < 1e-6 for r in ratio.unique())
    assert (ratio < 1).any()

    def group_err(wq: torch.Tensor) -> torch.Tensor:  # per (row, group) partial-output error
        d = (wq - w).reshape(64, 4, 32)
        return torch.einsum("tgl,ngl->ngt", x.reshape(256, 4, 32), d).pow(2).mean(-1)

    clipped = clip_weight(w, ratio, 32)
    scale, zero = group_qparams(clipped, scheme)
    from kiln.quantization.primitives import quantize_codes

    wq = dequantize_codes(quantize_codes(clipped, scale, zero, scheme), scale, zero, 32)
    assert torch.all(group_err(wq) <= group_err(fake_quantize(w, scheme)) + 1e-9)
    frozen = torch.zeros(64, dtype=torch.bool)
    frozen[:10] = True
    assert torch.all(search_clip(w, x, scheme, frozen)[:10] == 1.0)


def test_awq_with_clip_beats_awq_without_on_its_own_objective() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g) * 0.05
    w[:, 7] *= 25
    x = torch.randn(512, 96, generator=g)
    x[:, 5] *= 30
    scheme = IntScheme(4, 32, False)
    errs = []
    for clip in (False, True):
        codes, scale, zero, s, _ = awq_quantize(w, x, x.abs().mean(0), scheme, clip=clip)
        wq = dequantize_codes(codes, scale, zero, 32) / s
        errs.append((x @ (wq - w).t()).pow(2).mean().item())
    assert errs[1] < errs[0]


def test_first_token_weight_counts_position_zero_more() -> None:
    x = torch.randn(10, 8)
    plain, weighted = LayerStats(), LayerStats()
    gen = torch.Generator().manual_seed(0)
    accumulate(plain, x, True, False, False, 4, gen)
    accumulate(weighted, x, True, False, False, 4, gen, first_token_weight=5.0)
    torch.testing.assert_close(weighted.hessian - plain.hessian, 4.0 * torch.outer(x[0], x[0]))
    assert weighted.rows == plain.rows == 10
