"""A row's result from the block kernels must not depend on how many activation rows share the call.

Speculative decoding is lossless only if verifying k drafts (k + 1 rows in one matmul) computes each row
exactly as decoding it alone (one row) would; the kernels pick different tiles for 1-2 rows and for more,
so every tile shape must run the same arithmetic per output element. (It did not: GCC fused a scalar
multiply-add of the Q4 tail blocks into an FMA in some tile instantiations only, so the last row of a
9-row call rounded differently from the same row alone; the library now builds with -ffp-contract=off.)
Checked bit for bit, for each block layout, at 16- and 8-bit activations, and shapes with and without
tail blocks after the last whole 16-block chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from kiln.kernels.kquant_matmul import KQUANT_CODES
from kiln.kernels.native import load_native
from kiln.kernels.quant_matmul import set_activation_bits
from kiln.layers.gguf_q5 import unpack_q5_0
from kiln.layers.gguf_quant import GGUFQuantizedTensor, pack_blocks

needs_native = pytest.mark.skipif(not load_native(), reason="native kernels unavailable (no compiler)")
ROWS = 9  # a k = 8 verification: passes of 4, 4 and 1 rows on the 2 x 4 tile, against 8 x 1 for one row


def _gguf(qtype: str, n: int, k: int) -> GGUFQuantizedTensor:
    rng = np.random.default_rng(n + k)
    raw = gguf_quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), GGMLQuantizationType[qtype])
    return GGUFQuantizedTensor(qtype, torch.from_numpy(np.ascontiguousarray(raw)), k)


def _matmul(qtype: str, n: int, k: int):  # noqa: ANN202 - x → y for one weight
    if qtype in KQUANT_CODES:
        from tests.test_kquant_kernels import kblocks

        w = torch.from_numpy(kblocks(qtype, n, k, seed=n + k))
        return lambda x: torch.ops.kiln.kquant_matmul(x, w, KQUANT_CODES[qtype])
    t = _gguf(qtype, n, k)
    if qtype == "Q5_0":
        qs, qh, d, m = unpack_q5_0(t)
        return lambda x: torch.ops.kiln.quant_matmul_q5(x, qs, qh, d, m)
    qs, d, m = pack_blocks(t)
    return lambda x: torch.ops.kiln.quant_matmul(x, qs, d, m, qtype != "Q8_0")


@needs_native
@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("qtype, n, k", [("Q4_1", 131, 576), ("Q4_0", 64, 1536), ("Q4_1", 21, 1056),
                                         ("Q8_0", 131, 576), ("Q5_0", 67, 576), ("Q6_K", 37, 512),
                                         ("Q4_K", 37, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_is_the_same_alone_and_in_a_batch(bits: int, qtype: str, n: int, k: int, dtype: torch.dtype) -> None:
    set_activation_bits(bits)
    matmul = _matmul(qtype, n, k)
    x = (torch.randn(ROWS, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)
    together = matmul(x)
    for i in range(ROWS):
        assert torch.equal(matmul(x[i:i + 1]), together[i:i + 1]), f"row {i} differs alone vs in {ROWS} rows"
    assert torch.equal(matmul(x[:2]), together[:2])
