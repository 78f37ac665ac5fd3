"""kiln's native ops inside `torch.compile` graphs: traced whole (fullgraph) and equal to eager.

The ops carry fake implementations (kiln/kernels/fake_impls.py); without them dynamo cannot trace a
custom op and `fullgraph=True` fails. `aot_eager` runs the real AOT-autograd tracing on fake tensors
without inductor's C++ compile (minutes on this machine), which is what the fakes must survive.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from kiln.kernels.native import load_native
from kiln.layers.gguf_quant import GGUFQuantizedTensor, pack_blocks

pytestmark = pytest.mark.skipif(not load_native(), reason="needs the native kernel library")


def _packed(n: int, k: int, qtype: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    raw = quantize(w, GGMLQuantizationType[qtype])
    return pack_blocks(GGUFQuantizedTensor(qtype, torch.from_numpy(raw.view(np.uint8)).reshape(n, -1), k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_ops_trace_as_one_graph(dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    hidden, heads, kv_heads, head_dim, ffn = 64, 4, 2, 16, 96
    qkv_w = _packed(heads * head_dim + 2 * kv_heads * head_dim, hidden, "Q4_1", 0)
    up_w = _packed(2 * ffn, hidden, "Q4_0", 1)
    down_w = _packed(hidden, ffn, "Q8_0", 2)
    norm_w = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    cos = torch.randn(32, head_dim // 2)
    sin = torch.randn(32, head_dim // 2)
    ops = torch.ops.kiln

    def block(x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        normed = ops.add_rms_norm(x, residual, norm_w, 1e-5, True)  # residual += x, in place
        qkv = ops.quant_matmul(normed, *qkv_w, True)
        ops.rope_qkv_(qkv, positions, cos, sin, heads, kv_heads, head_dim)
        h = ops.silu_and_mul(ops.quant_matmul(normed, *up_w, True)[:1].contiguous())
        down = ops.quant_matmul(h, *down_w, False)
        dense = ops.quant_dequantize(*down_w, False, dtype)
        return qkv.sum() + down.float().sum() + residual.float().sum() + dense.float().sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, hidden).to(dtype)
    positions = torch.tensor([3, 7, 11])
    expected = block(x.clone(), x.clone(), positions)
    assert torch.equal(compiled(x.clone(), x.clone(), positions), expected)


def test_paged_attention_ops_trace_as_one_graph() -> None:
    torch._dynamo.reset()
    num_blocks, block_size, kv_heads, head_dim, heads = 6, 4, 2, 16, 4
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    k_data = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=torch.int8)
    k_scale = torch.zeros(num_blocks, block_size, kv_heads)
    v_data, v_scale = k_data.clone(), k_scale.clone()
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([9, 12], dtype=torch.int32)
    slots = torch.tensor([8, 23])
    ops = torch.ops.kiln

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ops.write_kv_quant(k, k_data, k_scale, slots)
        ops.write_kv_quant(v, v_data, v_scale, slots)
        full = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
        quant = ops.paged_decode_attention_quant(q, k_data, k_scale, v_data, v_scale, tables, lens, 0.25)
        return full + quant

    q, k, v = torch.randn(2, heads, head_dim), torch.randn(2, kv_heads, head_dim), torch.randn(2, kv_heads, head_dim)
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    expected = attend(q, k, v)
    assert torch.equal(compiled(q, k, v), expected)
