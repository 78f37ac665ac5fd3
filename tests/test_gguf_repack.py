"""Q5_0 and Q4_K blocks repacked for kiln's native kernels (kiln.layers.gguf_repack), against the
`gguf` library's own dequantization of the original blocks: Q5_0 → Q8_0 exactly, Q4_K → Q4_1
within the fp16 rounding of each sub-block's scale and min; and a Linear holding them natively
(block kernel, panel kernel, dense GEMM) against a matmul with the library's dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kiln.layers.gguf_quant import GGUFQuantizedTensor, GGUFQuantLinearMethod, family_of
from kiln.layers.gguf_repack import repack, repack_target
from kiln.layers.linear import Linear


def q5_0(n: int, k: int, seed: int = 0) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.05).astype(np.float32)
    return gguf_quantize(w, T.Q5_0)


def q4_k(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random but valid Q4_K super-blocks (gguf-py cannot quantize to Q4_K): small positive fp16
    d and dmin, random 6-bit scale/min bytes and nibbles."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = (rng.uniform(1e-4, 3e-3, (n, k // 256, 1))).astype(np.float16).view(np.uint8)
    blocks[..., 2:4] = (rng.uniform(1e-4, 3e-3, (n, k // 256, 1))).astype(np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def test_q5_0_becomes_q8_0_exactly() -> None:
    raw = q5_0(9, 160)
    out = repack("Q5_0", raw)
    assert repack_target("Q5_0") == "Q8_0" and out.shape == (9, 160 // 32 * 34)
    assert np.array_equal(gguf_dequantize(out, T.Q8_0), gguf_dequantize(raw, T.Q5_0))


def test_q4_k_becomes_q4_1_up_to_fp16_scales() -> None:
    raw = q4_k(7, 512)
    out = repack("Q4_K", raw)
    assert repack_target("Q4_K") == "Q4_1" and out.shape == (7, 512 // 32 * 20)
    ref, got = gguf_dequantize(raw, T.Q4_K), gguf_dequantize(out, T.Q4_1)
    # Per super-block: |error| <= 2^-11 (15 * d * 63 + dmin * 63), the fp16 rounding of d*sc and dmin*m.
    d = raw.reshape(7, 2, 144)[..., 0:2].copy().view(np.float16).astype(np.float32)
    dmin = raw.reshape(7, 2, 144)[..., 2:4].copy().view(np.float16).astype(np.float32)
    bound = (2.0 ** -11 * (15 * 63 * d + 63 * dmin)).repeat(256, axis=1).reshape(7, 512)
    err = np.abs(ref - got)
    assert (err <= bound).all()
    assert err.max() < 0.01 * np.abs(ref).max()


def test_family_counts_repacked_types_as_their_target() -> None:
    assert family_of({"Q4_K"}) == "Q4" and family_of({"Q4_K", "Q4_0"}) == "Q4"
    assert family_of({"Q5_0", "Q8_0"}) == "Q8"
    assert family_of({"Q4_K", "Q6_K"}) is None  # Q4_1 blocks and Q6_K super-blocks: no one layout


@pytest.mark.parametrize("source", ["Q5_0", "Q4_K"])
@pytest.mark.parametrize("rows", [1, 8, 200])
def test_a_native_linear_matches_the_gguf_dequantized_matmul(source: str, rows: int) -> None:
    n, k = 48, 512
    raw = q5_0(n, k, seed=rows) if source == "Q5_0" else q4_k(n, k, seed=rows)
    w = torch.from_numpy(gguf_dequantize(raw, T[source]).astype(np.float32))
    target = repack_target(source)
    layer = Linear(k, [n])
    layer.set_method(GGUFQuantLinearMethod("Q8" if target == "Q8_0" else "Q4", keep_dense=True))
    layer.weight_loader("weight", GGUFQuantizedTensor(target, torch.from_numpy(repack(source, raw)), k, origin=source))
    layer.method.process_weights_after_loading(layer)
    assert f"{source}→{target}" in layer.method.name
    x = torch.randn(rows, k)
    ref = x @ w.t()
    with torch.inference_mode():
        got = layer(x)
    # The block kernels round activations to int16 (kiln.kernels.quant_matmul); Q4_K's scales are fp16.
    assert (got - ref).abs().max().item() < 2e-3 * ref.abs().max().item()
