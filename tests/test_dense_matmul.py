"""kiln's dense decode kernel (csrc/dense_gemv.cpp, kiln.kernels.dense_matmul) against its plain-torch twin.

The twin computes fp32 products and sums rounded once to x's dtype; the kernel sums in another (fixed)
order, so fp32 outputs agree to fp32 rounding and bf16 outputs to one bf16 step. Shapes have K and N tails
(not multiples of the SIMD width or the row tile) and M from 1 to 9 (several activation tiles). A row's
output must not depend on the batch it is in, bit for bit; the plain path must take the kernel up to its
limit and torch's GEMM above; bad shapes are one clear error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels.dense_matmul import dense_kernel_rows, dense_linear, dense_matmul_reference
from kiln.kernels.native import load_native, simd_path

pytestmark = pytest.mark.skipif(not load_native(), reason="the dense kernel is part of the native library")

DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


def _data(m: int, n: int, k: int, x_dtype: torch.dtype, w_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g).to(x_dtype), (torch.randn(n, k, generator=g) / k ** 0.5).to(w_dtype))


@pytest.mark.parametrize("x_dtype, w_dtype", DTYPES)
@pytest.mark.parametrize("n, k", [(64, 576), (13, 40), (7, 100), (130, 17)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_kernel_matches_the_twin(x_dtype, w_dtype, n, k, m) -> None:
    x, w = _data(m, n, k, x_dtype, w_dtype)
    got, want = torch.ops.kiln.dense_matmul(x, w), dense_matmul_reference(x, w)
    assert got.dtype == x_dtype and got.shape == (m, n)
    if x_dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding of two fp32 sums that differ in their last bits
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("x_dtype, w_dtype", DTYPES)
def test_a_row_does_not_depend_on_its_batch(x_dtype, w_dtype) -> None:
    x, w = _data(9, 70, 200, x_dtype, w_dtype, seed=1)
    batch = torch.ops.kiln.dense_matmul(x, w)
    for i in range(9):
        assert torch.equal(torch.ops.kiln.dense_matmul(x[i:i + 1], w), batch[i:i + 1]), i
    assert torch.equal(torch.ops.kiln.dense_matmul(x[2:7], w), batch[2:7])


def test_dense_linear_takes_the_kernel_up_to_its_limit_only() -> None:
    x, w = _data(6, 32, 64, torch.float32, torch.float32, seed=2)
    bias = torch.randn(32)
    kernel = torch.ops.kiln.dense_matmul(x, w) + bias
    assert torch.equal(dense_linear(x, w, bias, 6), kernel)
    assert torch.equal(dense_linear(x, w, bias, 5), F.linear(x, w, bias))  # above the limit: torch's GEMM
    assert torch.equal(dense_linear(x.view(2, 3, 64), w, None, 6), torch.ops.kiln.dense_matmul(x, w).view(2, 3, 32))
    wt = w.t().contiguous().t()  # a non-contiguous weight: torch's GEMM, never an error
    assert torch.equal(dense_linear(x, wt, None, 6), F.linear(x, wt))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(dense_linear(xb, wb, None, 6), torch.ops.kiln.dense_matmul(xb, wb))
    assert torch.equal(dense_linear(xb, wb, None, 0), F.linear(xb, wb))


def test_the_limit_comes_from_the_tuning_or_the_built_ins(monkeypatch) -> None:
    import kiln.kernels.tune as tune

    monkeypatch.setattr(tune, "load_tuning", lambda threads=None: {"dense_kernel_rows": {"float32": 3}})
    expect = simd_path() in ("AVX-512", "AVX2")
    assert dense_kernel_rows(torch.float32) == (3 if expect else 0)
    assert dense_kernel_rows(torch.bfloat16) == (1 if expect else 0)  # not in this tuning: the built-in
    assert dense_kernel_rows(torch.float16) == 0
    assert dense_kernel_rows(torch.float32, "meta") == 0


def test_bad_shapes_are_one_clear_error() -> None:
    with pytest.raises(RuntimeError, match="same K"):
        torch.ops.kiln.dense_matmul(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.kiln.dense_matmul(torch.randn(2, 8).half(), torch.randn(4, 8))
