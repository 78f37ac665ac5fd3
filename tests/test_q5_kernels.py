"""GGUF Q5_0 kept in 5 bits (kiln.layers.gguf_q5): the Q5 layout dequantizes to the gguf library's exact
values, and the native block, panel and dequantize kernels equal their plain-torch twins (as
tests/test_quant_kernels.py checks for Q4/Q8), on shapes with an odd number of 32-blocks (the Q4 pair
layout's last half-pair) and every tail of the kernels' tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kiln.kernels.native import load_native
from kiln.kernels.quant_matmul import dequantize_q5_reference, quant_matmul_q5_reference
from kiln.layers.gguf_q5 import GGUFQ5LinearMethod, unpack_q5_0
from kiln.layers.gguf_quant import GGUFQuantizedTensor, family_of
from kiln.layers.linear import Linear

needs_native = pytest.mark.skipif(not load_native(), reason="native kernels unavailable (no compiler)")


def q5_blocks(n: int, k: int, seed: int = 0) -> tuple[GGUFQuantizedTensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    raw = gguf_quantize(w, GGMLQuantizationType.Q5_0)
    return (GGUFQuantizedTensor("Q5_0", torch.from_numpy(np.ascontiguousarray(raw)), k),
            gguf_dequantize(raw, GGMLQuantizationType.Q5_0).astype(np.float32))


def test_q5_layout_dequantizes_to_the_gguf_values() -> None:
    t, expected = q5_blocks(7, 96)
    qs, qh, d, m = unpack_q5_0(t)
    assert torch.equal(dequantize_q5_reference(qs, qh, d, m), torch.from_numpy(expected))
    # negative control: without the fifth bits the values are off
    assert not torch.equal(dequantize_q5_reference(qs, torch.zeros_like(qh), d, m), torch.from_numpy(expected))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_q5_dequantize_is_exact(dtype: torch.dtype) -> None:
    t, expected = q5_blocks(33, 160, seed=1)
    qs, qh, d, m = unpack_q5_0(t)
    got = torch.ops.kiln.quant_dequantize_q5(qs, qh, d, m, dtype)
    assert torch.equal(got, dequantize_q5_reference(qs, qh, d, m, dtype))
    if dtype == torch.float32:
        assert torch.equal(got, torch.from_numpy(expected))


@needs_native
@pytest.mark.parametrize("m_rows", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize("n, k", [(1, 32), (37, 96), (129, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_q5_matmul_equals_reference(m_rows: int, n: int, k: int, dtype: torch.dtype) -> None:
    t, _ = q5_blocks(n, k, seed=n + k)
    qs, qh, d, m = unpack_q5_0(t)
    x = (torch.randn(m_rows, k, generator=torch.Generator().manual_seed(m_rows + k)) * 3).to(dtype)
    got = torch.ops.kiln.quant_matmul_q5(x, qs, qh, d, m)
    want = quant_matmul_q5_reference(x.float(), qs, qh, d, m)
    assert got.dtype == dtype and got.shape == (m_rows, n)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item()), (got.float() - want).abs().max()


@needs_native
@pytest.mark.parametrize("m_rows", [1, 4, 17, 64, 130])
@pytest.mark.parametrize("n, k", [(1, 32), (7, 96), (37, 576), (129, 1536)])
def test_native_q5_panels_equal_dense_over_dequantized_weights(m_rows: int, n: int, k: int) -> None:
    t, _ = q5_blocks(n, k, seed=n * k)
    qs, qh, d, m = unpack_q5_0(t)
    x = torch.randn(m_rows, k, generator=torch.Generator().manual_seed(m_rows * 1000 + k)) * 3
    got = torch.ops.kiln.quant_matmul_panels_q5(x, qs, qh, d, m)
    w = dequantize_q5_reference(qs, qh, d, m)
    want, magnitude = x @ w.t(), (x.abs() @ w.abs().t()).max()
    assert (got - want).abs().max() <= 1e-5 * max(want.abs().max(), magnitude), (got - want).abs().max()


def test_family_and_layer() -> None:
    assert family_of({"Q5_0"}) == "Q5"
    assert family_of({"Q5_0", "Q8_0"}) == "Q8"  # mixed: the exact Q8_0 repack
    t, expected = q5_blocks(48, 64, seed=3)
    layer = Linear(64, [16, 32], ["a", "b"], dtype=torch.float32, device=torch.device("cpu"))
    layer.set_method(GGUFQ5LinearMethod())
    rows = GGUFQuantizedTensor("Q5_0", t.raw[:16].clone(), 64), GGUFQuantizedTensor("Q5_0", t.raw[16:].clone(), 64)
    layer.weight_loader("weight", rows[0], "a")
    layer.weight_loader("weight", rows[1], "b")
    assert torch.equal(layer.method.dequantize_weight(layer, torch.float32), torch.from_numpy(expected))
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ torch.from_numpy(expected).t(), rtol=1e-3, atol=1e-3)
