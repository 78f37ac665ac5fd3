"""Which part of the model a rank holds, and the cutting of checkpoint tensors, without any process group.

References: for the heads, the GQA rule itself (query head j reads KV head j // (H / Hkv)); for the
tensors, the full tensor dequantized (gguf's own dequantizer, kiln's plain-torch `dequantize_codes`) and
then sliced, which a sliced GGUF block tensor or a sliced INT4/INT8 buffer must dequantize to exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from kiln.config import ModelConfig
from kiln.distributed.slicing import ColumnSlice, RowSlice
from kiln.distributed.topology import RankShare, check_tp_size, valid_tp_sizes
from kiln.kernels.dequant import dequantize_codes, unpack_int4
from kiln.layers.gguf_quant import GGUFQuantizedTensor
from kiln.layers.linear import Linear
from kiln.layers.quant_linear import IntWeightLinearMethod


def _cfg(heads: int = 9, kv_heads: int = 3, ffn: int = 1536, vocab: int = 49152) -> ModelConfig:
    return ModelConfig("llama", vocab, 576, ffn, 2, heads, kv_heads, 64)


def test_default_model_sizes_and_the_error_naming_them() -> None:
    assert valid_tp_sizes(9, 3, 1536) == [1, 3]  # 9 would split the MLP width 1536 unevenly
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 .*9 query heads, 3 KV heads.*valid sizes: 1, 3"):
        check_tp_size(_cfg(), 2)


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (8, 2), (8, 8), (4, 1)])
def test_every_query_head_finds_its_kv_head_on_its_rank(heads: int, kv_heads: int) -> None:
    cfg = _cfg(heads, kv_heads, ffn=4 * 9 * 64)
    d = cfg.head_dim
    for n in valid_tp_sizes(heads, kv_heads, cfg.intermediate_size):
        held_q: list[int] = []
        for rank in range(n):
            share = RankShare.of(cfg, rank, n)
            q = range(share.q_rows().start // d, share.q_rows().stop // d)
            kv = range(share.kv_rows().start // d, share.kv_rows().stop // d)
            assert len(kv) == share.kv_heads and len(q) == share.heads
            assert all(j // (heads // kv_heads) in kv for j in q), (n, rank)
            # the rank's local GQA grouping (local q head i reads local kv head i // (heads_r / kv_r)) agrees
            assert all(kv[i // (share.heads // share.kv_heads)] == j // (heads // kv_heads) for i, j in enumerate(q))
            held_q.extend(q)
        assert held_q == list(range(heads))


def test_vocabulary_ranges_pad_the_last_rank() -> None:
    shares = [RankShare.of(_cfg(vocab=10), r, 3) for r in range(3)]
    assert [s.vocab_rows() for s in shares] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert all(s.vocab_per_rank == 4 for s in shares)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_slice_like_their_dequantized_values(qtype: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 128)).astype(np.float32)
    t = GGUFQuantizedTensor(qtype, torch.from_numpy(quantize(w, GGMLQuantizationType[qtype])), 128)
    full = t.dequantize()
    layer = Linear(64, [12])
    cut = RowSlice(slice(64, 128), rank=1)(layer, "weight", t, None)
    assert isinstance(cut, GGUFQuantizedTensor)  # still blocks: the native kernels run it
    assert torch.equal(cut.dequantize(), full[:, 64:128])
    rows = ColumnSlice({None: slice(4, 8)}, (12,), padded=6)(Linear(128, [6]), "weight", t, None)
    assert torch.equal(rows.dequantize()[:4], full[4:8]) and not rows.dequantize()[4:].any()
    odd = RowSlice(slice(48, 96), rank=1)(Linear(48, [12]), "weight", t, None)  # splits a block: dense
    assert isinstance(odd, torch.Tensor) and torch.equal(odd, full[:, 48:96])


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, 64), (8, -1)])
def test_kiln_int_buffers_slice_like_their_dequantized_weight(bits: int, group: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n, k = 24, 128
    groups = 1 if group == -1 else k // group
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.uint8)
    qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)) if bits == 4 else codes
    scales = (torch.rand(n, groups, generator=gen) + 0.5).half()
    zeros = torch.randint(0, 2 ** bits, (n, groups), generator=gen, dtype=torch.uint8)
    full = dequantize_codes(codes, scales, zeros, group)
    method = IntWeightLinearMethod(bits, group, sym=bits == 8)
    # row-parallel: input columns 64..128
    layer = Linear(64, [n])
    layer.set_method(method)
    cut = RowSlice(slice(64, 128), rank=1)
    parts = {name: cut(layer, name, t, None) for name, t in (("qweight", qweight), ("scales", scales),
                                                             ("qzeros", zeros))}
    part_codes = unpack_int4(parts["qweight"]) if bits == 4 else parts["qweight"]
    assert torch.equal(dequantize_codes(part_codes, parts["scales"], parts["qzeros"], group), full[:, 64:128])
    # column-parallel, fused: the whole buffer of shards a (16 rows) and b (8 rows), this rank's half of each
    fused = Linear(k, [8, 4], ["a", "b"])
    fused.set_method(IntWeightLinearMethod(bits, group, sym=bits == 8))
    col = ColumnSlice({"a": slice(8, 16), "b": slice(4, 8)}, (16, 8))
    keep = [*range(8, 16), *range(20, 24)]
    parts = {name: col(fused, name, t, None) for name, t in (("qweight", qweight), ("scales", scales),
                                                             ("qzeros", zeros))}
    part_codes = unpack_int4(parts["qweight"]) if bits == 4 else parts["qweight"]
    assert torch.equal(dequantize_codes(part_codes, parts["scales"], parts["qzeros"], group), full[keep])


def test_a_cut_inside_a_quantization_group_is_refused() -> None:
    layer = Linear(48, [4])
    layer.set_method(IntWeightLinearMethod(4, 32, sym=False))
    with pytest.raises(ValueError, match="groups of 32 columns"):
        RowSlice(slice(48, 96), rank=1)(layer, "scales", torch.zeros(4, 3, dtype=torch.float16), None)
