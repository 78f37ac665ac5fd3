"""Fast attention over the paged KV cache (the hot path; its twin is attention_reference).

- Decode sequences (one new token each) go in one call to the native kernel, which reads
  K/V in place through the block tables. Without the native library, or on a non-CPU
  device, decodes fall back to a batched gather + SDPA.
- Short query runs after a cached prefix (speculative verification: the last token plus k
  drafts; small prefill chunks) go through the same decode kernel, one kernel row per query
  position with its own causal length. Each row is then computed exactly as if the tokens had
  been decoded one by one, which keeps speculative decoding's output identical to plain
  decoding even in bf16.
- Longer prefill chunks go through kiln's flash-style prefill kernel per sequence
  (csrc/prefill_attention.cpp: online softmax over 32-key tiles of the cached prefix plus the
  chunk, read from the blocks; float caches, head_dim 64/128, AVX-512), otherwise through
  `scaled_dot_product_attention` on the gathered context with a causal mask offset by the prefix.
  `KILN_PREFILL_ATTENTION=sdpa` forces the latter (benchmarks/fused_kernels.py compares them).

Sliding-window layers (`window=W`: a query at position p sees keys p - W < k <= p) take those
routes while every sequence of the step is at most W tokens long (the window then hides nothing);
past that, decode rows and short runs after a prefix take the native decode kernel's windowed
variant (`paged_decode_attention_window`: its loops start at the window's first key; float caches),
and prefill chunks (and quantized caches) take `_sdpa_window`: SDPA over only the blocks the window
can still see, with the window masked. The native prefill kernel has no window (nor head_dim 256).
Nothing before a window is ever read, so blocks the hybrid KV cache has freed behind it are never touched.

A float16/bfloat16 cache under float32 queries (`--kv-cache-dtype float16`) takes the same routes:
the native kernel widens each K/V row as it reads it; gathers convert to the query dtype.
A quantized cache (int8 / fp8_e4m3, `QuantizedKV` pairs from kv_quant) takes the same routes:
the native decode kernel dequantizes inside its dot products; gathers dequantize to the query
dtype before SDPA. Every path reads K/V back from the cache, so a token's attention does not
depend on whether its context arrived by prefill or by decode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.kernels.attention_metadata import AttentionMetadata
from kiln.kernels.attention_reference import gather_context
from kiln.kernels.kv_quant import QuantizedKV, write_kv_quantized
from kiln.kernels import switches
from kiln.kernels.native import load_native

# Query runs up to this long after a prefix use the decode kernel row by row (see above):
# the last token plus the most drafts SpeculativeConfig allows (16).
MAX_ROWWISE_QUERY = 17


KVCacheTensor = torch.Tensor | QuantizedKV


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: KVCacheTensor, v_cache: KVCacheTensor, slot_mapping: torch.Tensor
) -> None:
    """Store this step's K/V [T, Hkv, D] into their slots of the [blocks, block_size, Hkv, D] caches
    (quantizing on store for a QuantizedKV cache)."""
    if type(k_cache) is QuantizedKV:
        write_kv_quantized(k, v, k_cache, v_cache, slot_mapping)
        return
    k_cache.view(-1, k_cache.shape[2], k_cache.shape[3]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, v_cache.shape[2], v_cache.shape[3]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def native_reads(q_dtype: torch.dtype, k_cache: KVCacheTensor) -> bool:
    """Whether the native decode kernel reads this cache under queries of `q_dtype`: a cache in the
    query dtype, a quantized one, or a float16/bfloat16 cache under float32 queries."""
    if type(k_cache) is QuantizedKV or k_cache.dtype == q_dtype:
        return True
    return q_dtype == torch.float32 and k_cache.dtype in (torch.float16, torch.bfloat16)


def native_prefill(q: torch.Tensor, k_cache: KVCacheTensor) -> bool:
    """Whether a prefill chunk of `q` runs kiln's paged prefill kernel over this cache."""
    if type(k_cache) is QuantizedKV or q.shape[-1] not in (64, 128) or not native_reads(q.dtype, k_cache):
        return False
    if switches.active().prefill_attention == "sdpa":
        return False
    return q.device.type == "cpu" and load_native() and torch.ops.kiln.paged_prefill_supported()


def _prefill_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_len: int, scale: float) -> torch.Tensor:
    return torch.ops.kiln.paged_prefill_attention(q, k_cache, v_cache, block_table, seq_len, scale)


def _native_decode(q: torch.Tensor, k_cache: KVCacheTensor, v_cache: KVCacheTensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if type(k_cache) is QuantizedKV:
        return torch.ops.kiln.paged_decode_attention_quant(q, k_cache.data, k_cache.scale, v_cache.data, v_cache.scale,
                                                           block_tables, seq_lens, scale)
    return torch.ops.kiln.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


def _gather_blocks(cache: KVCacheTensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if type(cache) is QuantizedKV:
        return cache.gather_blocks(table, dtype)
    return cache[table].to(dtype)


def _decode_fallback(
    q: torch.Tensor, k_cache: KVCacheTensor, v_cache: KVCacheTensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Batched decode by gathering padded contexts; used only where the native kernel is absent."""
    n = meta.num_decodes
    max_len = max(meta.seq_lens[:n])
    block_size = k_cache.shape[1]
    n_blocks = (max_len + block_size - 1) // block_size
    table = meta.block_tables[:n, :n_blocks].long()
    k = _gather_blocks(k_cache, table, q.dtype).flatten(1, 2)[:, :max_len]  # [n, S, Hkv, D]
    v = _gather_blocks(v_cache, table, q.dtype).flatten(1, 2)[:, :max_len]
    lens = meta.seq_lens_tensor[:n].to(q.device)
    mask = torch.arange(max_len, device=q.device).unsqueeze(0) < lens.unsqueeze(1)  # [n, S]
    out = F.scaled_dot_product_attention(
        q[:n].unsqueeze(2),  # [n, Hq, 1, D]
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


def _sdpa_prefill(q: torch.Tensor, k_cache: KVCacheTensor, v_cache: KVCacheTensor, block_table: torch.Tensor,
                  seq_len: int, scale: float) -> torch.Tensor:
    """One sequence's chunk q [L, Hq, D] over its gathered context with torch's SDPA."""
    q_len = q.shape[0]
    k = gather_context(k_cache, block_table, seq_len).to(q.dtype).transpose(0, 1)  # [Hkv, S, D]
    v = gather_context(v_cache, block_table, seq_len).to(q.dtype).transpose(0, 1)
    # 4-D [1, H, L, D]: with 3-D inputs torch's CPU SDPA takes the unfused math path
    # (bmm + softmax + mask), 4.5x slower than its flash kernel on a 1024-token prefill.
    qi = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
    k, v = k.unsqueeze(0), v.unsqueeze(0)
    if q_len == seq_len:
        o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [L, S]
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def _sdpa_window(q: torch.Tensor, k_cache: KVCacheTensor, v_cache: KVCacheTensor, block_table: torch.Tensor,
                 seq_len: int, scale: float, window: int) -> torch.Tensor:
    """One sequence's queries q [L, Hq, D] (the last L of seq_len tokens) over the keys their window sees.

    Only blocks from the one holding the first visible key (position seq_len - L - window + 1) on are
    gathered: earlier entries of `block_table` may already be freed and reused."""
    q_len = q.shape[0]
    block_size = k_cache.shape[1]
    first_block = max(seq_len - q_len - window + 1, 0) // block_size
    start = first_block * block_size
    table = block_table[first_block:]
    k = gather_context(k_cache, table, seq_len - start).to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, Hkv, S', D]
    v = gather_context(v_cache, table, seq_len - start).to(q.dtype).transpose(0, 1).unsqueeze(0)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
    k_pos = torch.arange(start, seq_len, device=q.device).unsqueeze(0)
    mask = (k_pos <= q_pos) & (k_pos > q_pos - window)  # [L, S']
    o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


def _windowed(q: torch.Tensor, k_cache: KVCacheTensor, v_cache: KVCacheTensor, meta: AttentionMetadata,
              scale: float, window: int) -> torch.Tensor:
    """Sliding-window attention: decode rows (and short runs after a prefix, row by row) through the
    native decode kernel's windowed variant over a float cache; longer chunks, and quantized caches,
    through `_sdpa_window`."""
    native = (q.device.type == "cpu" and type(k_cache) is not QuantizedKV and native_reads(q.dtype, k_cache)
              and load_native())
    n_dec = meta.num_decodes
    if native and n_dec == meta.num_seqs:
        return torch.ops.kiln.paged_decode_attention_window(q, k_cache, v_cache, meta.block_tables,
                                                            meta.seq_lens_tensor, scale, window)
    out = torch.empty_like(q)
    if native and n_dec:
        out[:n_dec] = torch.ops.kiln.paged_decode_attention_window(
            q[:n_dec], k_cache, v_cache, meta.block_tables[:n_dec], meta.seq_lens_tensor[:n_dec], scale, window)
    for i in range(n_dec if native else 0, meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        q_len, seq_len = end - start, meta.seq_lens[i]
        if native and q_len <= MAX_ROWWISE_QUERY and q_len < seq_len:
            lens = torch.arange(seq_len - q_len + 1, seq_len + 1, dtype=meta.seq_lens_tensor.dtype, device=q.device)
            tables = meta.block_tables[i].unsqueeze(0).expand(q_len, -1).contiguous()
            out[start:end] = torch.ops.kiln.paged_decode_attention_window(q[start:end], k_cache, v_cache, tables, lens,
                                                                          scale, window)
            continue
        out[start:end] = _sdpa_window(q[start:end], k_cache, v_cache, meta.block_tables[i], seq_len, scale, window)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: KVCacheTensor,
    v_cache: KVCacheTensor,
    meta: AttentionMetadata,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] (this step's K/V already written) → out [T, Hq, D].

    `window`: sliding-window attention (see the module docstring); None: full causal attention."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if window is not None and max(meta.seq_lens, default=0) > window:
        return _windowed(q, k_cache, v_cache, meta, scale, window)
    n_dec = meta.num_decodes
    native = q.device.type == "cpu" and native_reads(q.dtype, k_cache) and load_native()
    if n_dec == meta.num_seqs and native:  # pure decode step: no output copy
        return _native_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, scale)
    out = torch.empty_like(q)
    if n_dec:
        if native:
            out[:n_dec] = _native_decode(
                q[:n_dec], k_cache, v_cache, meta.block_tables[:n_dec], meta.seq_lens_tensor[:n_dec], scale
            )
        else:
            out[:n_dec] = _decode_fallback(q, k_cache, v_cache, meta, scale)
    prefill_native = native and meta.num_seqs > n_dec and native_prefill(q, k_cache)
    for i in range(n_dec, meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        q_len, seq_len = end - start, meta.seq_lens[i]
        if native and q_len <= MAX_ROWWISE_QUERY and q_len < seq_len:
            lens = torch.arange(seq_len - q_len + 1, seq_len + 1, dtype=meta.seq_lens_tensor.dtype, device=q.device)
            tables = meta.block_tables[i].unsqueeze(0).expand(q_len, -1).contiguous()
            out[start:end] = _native_decode(q[start:end], k_cache, v_cache, tables, lens, scale)
            continue
        if prefill_native:
            out[start:end] = _prefill_kernel(q[start:end], k_cache, v_cache, meta.block_tables[i], seq_len, scale)
            continue
        out[start:end] = _sdpa_prefill(q[start:end], k_cache, v_cache, meta.block_tables[i], seq_len, scale)
    return out
