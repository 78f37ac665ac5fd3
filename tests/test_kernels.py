"""Every fast kernel against its plain-torch twin, on random shapes and both dtypes."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import fused
from kiln.kernels.attention_metadata import build_attention_metadata
from kiln.kernels.attention_reference import paged_attention_reference
from kiln.kernels.native import load_native
from kiln.kernels.paged_attention import _decode_fallback, paged_attention, write_kv

pytestmark = pytest.mark.skipif(not load_native(), reason="needs the native kernel library (a C++ compiler)")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype, with_residual) -> None:
    torch.manual_seed(0)
    x, r, w = torch.randn(7, 96, dtype=dtype), torch.randn(7, 96, dtype=dtype), torch.randn(96, dtype=dtype)
    ref_out, ref_res = fused.add_rms_norm_reference(x, r if with_residual else None, w, 1e-5)
    x_before, r_before = x.clone(), r.clone()
    out = torch.ops.kiln.add_rms_norm(x, r if with_residual else x, w, 1e-5, with_residual)
    assert torch.allclose(out.float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(x, x_before)  # x is never written
    # with a residual, the residual stream is updated in place to x + residual; without, untouched
    assert torch.equal(r, ref_res if with_residual else r_before)
    # the dispatcher returns the same pair as the reference
    d_out, d_res = fused.add_rms_norm(x, r_before.clone() if with_residual else None, w, 1e-5)
    assert torch.equal(d_out, out) and torch.equal(d_res, ref_res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width, scale", [(5, 80, 4.0), (1, 83, 4.0), (12, 37, 60.0)])  # SIMD tails, exp clamps
def test_silu_and_mul(dtype, rows, width, scale) -> None:
    gate_up = torch.randn(rows, 2 * width, dtype=dtype) * scale
    ref = fused.silu_and_mul_reference(gate_up).float()
    assert torch.allclose(torch.ops.kiln.silu_and_mul(gate_up).float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.allclose(fused.silu_and_mul(gate_up).float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_qkv(dtype) -> None:
    from kiln.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(32, 256, 10000.0)
    qkv = torch.randn(6, (4 + 2 * 2) * 32, dtype=dtype)
    pos = torch.tensor([0, 1, 7, 100, 255, 3])
    ref = qkv.clone()
    fused.rope_qkv_reference(ref, pos, rope.cos, rope.sin, 4, 2, 32)
    torch.ops.kiln.rope_qkv_(qkv, pos, rope.cos, rope.sin, 4, 2, 32)
    assert torch.allclose(qkv.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, -2 * 32:], ref[:, -2 * 32:])  # v untouched


def _random_paged_batch(dtype, query_lens, seq_lens, hq=6, hkv=2, d=32, block_size=4, seed=0, cache_dtype=None):
    cache_dtype = cache_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 3
    perm = torch.randperm(n_blocks, generator=g).tolist()  # scattered, non-contiguous blocks
    block_ids, used = [], 0
    for s in seq_lens:
        n = (s + block_size - 1) // block_size
        block_ids.append(perm[used:used + n])
        used += n
    meta = build_attention_metadata(query_lens, seq_lens, block_ids, block_size)
    k_cache = torch.randn(n_blocks, block_size, hkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(n_blocks, block_size, hkv, d, generator=g).to(cache_dtype)
    t = sum(query_lens)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    write_kv(torch.randn(t, hkv, d, generator=g).to(dtype), torch.randn(t, hkv, d, generator=g).to(dtype),
             k_cache, v_cache, meta.slot_mapping)
    return q, k_cache, v_cache, meta


# (query dtype, cache dtype): a cache in the query dtype, or a 16-bit cache under fp32 queries
# (the native kernel widens its rows; the reference gathers and converts)
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float32, torch.float16), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype, cache_dtype", DTYPE_PAIRS, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("query_lens, seq_lens", [
    ([1, 1, 1], [1, 9, 33]),  # decodes only
    ([1, 1, 5, 12], [4, 17, 5, 20]),  # decodes + a fresh prefill + a chunk after a cached prefix
    ([7], [7]),  # prefill only
    ([1, 24, 9], [30, 40, 9]),  # a long chunk after a prefix (SDPA with an offset mask), a fresh prefill
])
def test_paged_attention_matches_reference(dtype, cache_dtype, query_lens, seq_lens) -> None:
    q, k_cache, v_cache, meta = _random_paged_batch(dtype, query_lens, seq_lens, cache_dtype=cache_dtype)
    ref = paged_attention_reference(q, k_cache, v_cache, meta)
    out = paged_attention(q, k_cache, v_cache, meta)
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype])
    if meta.num_decodes:
        fb = _decode_fallback(q, k_cache, v_cache, meta, q.shape[-1] ** -0.5)
        n = meta.num_decodes
        assert torch.allclose(fb.float(), ref[:n].float(), atol=TOL[dtype] * 5, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype, cache_dtype", DTYPE_PAIRS, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seq_lens", [[1, 15, 16, 17, 33], [70, 5, 131]])
def test_paged_decode_head_sizes_with_simd_task(dtype, cache_dtype, d, seq_lens) -> None:
    """Head sizes 64 and 128 run the AVX-512 task (16-key score groups, vector softmax and V walk by
    block) where present: every length around a 16-key group boundary against the reference."""
    q, k_cache, v_cache, meta = _random_paged_batch(dtype, [1] * len(seq_lens), seq_lens, hq=6, hkv=2, d=d,
                                                    block_size=16, cache_dtype=cache_dtype)
    ref = paged_attention_reference(q, k_cache, v_cache, meta)
    out = paged_attention(q, k_cache, v_cache, meta)
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype, cache_dtype", DTYPE_PAIRS, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 2), (8, 2), (10, 2), (4, 1)])
@pytest.mark.parametrize("batch", [1, 5])
def test_paged_decode_gqa_group_sizes(dtype, cache_dtype, hq, hkv, batch) -> None:
    """Every GQA group size the SIMD decode tasks special-case (the AVX2 task loads each key and value row once
    for groups of 2-4 query heads) and two they do not (1, 5), one sequence (a task per KV head) and five (a
    task per sequence), head size 64 and lengths around the key-group boundaries: against the reference."""
    seq_lens = [1, 7, 8, 9, 23][:batch] if batch > 1 else [41]
    q, k_cache, v_cache, meta = _random_paged_batch(dtype, [1] * len(seq_lens), seq_lens, hq=hq, hkv=hkv, d=64,
                                                    block_size=16, cache_dtype=cache_dtype, seed=hq * 10 + hkv)
    ref = paged_attention_reference(q, k_cache, v_cache, meta)
    out = paged_attention(q, k_cache, v_cache, meta)
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype, cache_dtype", DTYPE_PAIRS, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d, block_size", [(32, 4), (64, 16), (128, 16)])
def test_short_query_after_prefix_equals_decoding_token_by_token(dtype, cache_dtype, d, block_size) -> None:
    """Speculative verification (last token + k drafts in one call) must give bit-identical
    attention rows to decoding those tokens one at a time (d 64 / 128: the AVX-512 task with its
    16-key score groups and vector softmax, where present)."""
    from kiln.kernels.native import load_native

    if not load_native():
        pytest.skip("native kernels unavailable (no compiler)")
    q, k_cache, v_cache, meta = _random_paged_batch(dtype, [5], [37], d=d, block_size=block_size,
                                                    cache_dtype=cache_dtype)
    together = paged_attention(q, k_cache, v_cache, meta)
    for r in range(5):
        blocks = meta.block_tables[0].tolist()[: (33 + r + block_size - 1) // block_size]
        one = build_attention_metadata([1], [33 + r], [blocks], block_size)
        alone = paged_attention(q[r:r + 1], k_cache, v_cache, one)
        assert torch.equal(alone[0], together[r]), r
