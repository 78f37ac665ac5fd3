"""kiln's flash-style paged prefill kernel (csrc/prefill_attention.cpp) against the plain-torch
reference, and its place in paged_attention (which prefill chunks take it, which do not)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kiln.kernels import paged_attention as pa
from kiln.kernels import switches
from kiln.kernels.attention_metadata import build_attention_metadata
from kiln.kernels.attention_reference import paged_attention_reference
from kiln.kernels.native import load_native
from test_kernels import _random_paged_batch

pytestmark = pytest.mark.skipif(not (load_native() and torch.ops.kiln.paged_prefill_supported()),
                                reason="the prefill kernel is AVX-512 native code")

# (query dtype, cache dtype) pairs the kernel takes, and the tolerance against the fp32 reference
PAIRS = [(torch.float32, torch.float32, 2e-5), (torch.float32, torch.float16, 2e-5),
         (torch.float32, torch.bfloat16, 2e-5), (torch.bfloat16, torch.bfloat16, 2e-2)]


def _kernel(q, k_cache, v_cache, meta, i):
    start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
    return torch.ops.kiln.paged_prefill_attention(q[start:end], k_cache, v_cache, meta.block_tables[i],
                                                  meta.seq_lens[i], q.shape[-1] ** -0.5)


@pytest.mark.parametrize("dtype, cache_dtype, tol", PAIRS, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d, hq, hkv", [(64, 9, 3), (64, 4, 4), (128, 8, 2)])
@pytest.mark.parametrize("query_len, seq_len", [
    (1, 1), (1, 40), (7, 7), (33, 33), (31, 95), (70, 70), (64, 200),  # fresh prompts and chunks after a prefix,
    (100, 133),                                                        # tile edges on both sides of 32
])
def test_prefill_kernel_matches_reference(dtype, cache_dtype, tol, d, hq, hkv, query_len, seq_len) -> None:
    q, k_cache, v_cache, meta = _random_paged_batch(dtype, [query_len], [seq_len], hq=hq, hkv=hkv, d=d,
                                                    block_size=16, cache_dtype=cache_dtype, seed=seq_len + d)
    ref = paged_attention_reference(q, k_cache, v_cache, meta)
    out = _kernel(q, k_cache, v_cache, meta, 0)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert (out.float() - ref.float()).abs().max().item() < tol


def test_a_query_row_does_not_depend_on_how_the_chunk_was_split() -> None:
    """A prompt prefilled in one call or in chunks (chunked prefill, a prefix-cache hit) gives
    bit-identical attention rows: each row walks the same key tiles in the same order."""
    q, k_cache, v_cache, meta = _random_paged_batch(torch.float32, [90], [90], hq=9, hkv=3, d=64, block_size=16,
                                                    cache_dtype=torch.float16)
    whole = _kernel(q, k_cache, v_cache, meta, 0)
    blocks = meta.block_tables[0].tolist()
    for lo, hi in [(0, 17), (17, 64), (64, 90)]:
        part = build_attention_metadata([hi - lo], [hi], [blocks[: (hi + 15) // 16]], 16)
        assert torch.equal(_kernel(q[lo:hi], k_cache, v_cache, part, 0), whole[lo:hi]), (lo, hi)


def test_paged_attention_routes_prefill_chunks_through_the_kernel(monkeypatch) -> None:
    calls = []
    real = torch.ops.kiln.paged_prefill_attention
    monkeypatch.setattr(pa, "_prefill_kernel", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    # a decode, a fresh prefill, a long chunk after a prefix, a short run after a prefix (decode kernel)
    q, k_cache, v_cache, meta = _random_paged_batch(torch.float32, [1, 40, 30, 5], [9, 40, 70, 45], hq=9, hkv=3,
                                                    d=64, block_size=16, cache_dtype=torch.float16)
    out = pa.paged_attention(q, k_cache, v_cache, meta)
    assert calls == [40, 30]
    ref = paged_attention_reference(q, k_cache, v_cache, meta)
    assert (out - ref).abs().max().item() < 2e-5
    monkeypatch.setattr(switches, "_active", replace(switches.active(), prefill_attention="sdpa"))  # gather + SDPA
    calls.clear()
    sdpa = pa.paged_attention(q, k_cache, v_cache, meta)
    assert calls == []
    assert (sdpa - ref).abs().max().item() < 2e-5


def test_quantized_cache_and_other_head_sizes_keep_the_sdpa_path() -> None:
    from kiln.kernels.kv_quant import allocate_kv_caches

    (k_int8, _), = allocate_kv_caches(1, (2, 16, 2, 64), "int8", torch.float32, "cpu")
    assert not pa.native_prefill(torch.randn(4, 6, 64), k_int8)  # a 1-byte cache: gather + SDPA
    q = torch.randn(4, 6, 32)
    assert not pa.native_prefill(q, torch.zeros(2, 16, 2, 32))  # head_dim 32: not a kernel shape
    assert pa.native_prefill(torch.randn(4, 6, 64), torch.zeros(2, 16, 2, 64, dtype=torch.float16))
    assert not pa.native_prefill(torch.randn(4, 6, 64, dtype=torch.bfloat16), torch.zeros(2, 16, 2, 64))


@pytest.mark.parametrize("bad, message", [
    (dict(d=80), "head_dim 64 and 128"),
    (dict(seq_len=3), "must cover"),
    (dict(table_len=1), "block_table too short"),
    (dict(cache_dtype=torch.float16, q_dtype=torch.bfloat16), "supports float32 queries"),
])
def test_bad_arguments_are_one_clear_error(bad, message) -> None:
    d = bad.get("d", 64)
    q = torch.randn(8, 4, d, dtype=bad.get("q_dtype", torch.float32))
    cache = torch.zeros(4, 16, 2, d, dtype=bad.get("cache_dtype", torch.float32))
    table = torch.arange(bad.get("table_len", 4), dtype=torch.int32)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.kiln.paged_prefill_attention(q, cache, cache, table, bad.get("seq_len", 40), 0.125)
