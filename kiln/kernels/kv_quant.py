"""Quantized paged KV cache: int8 or fp8 (E4M3) values with one fp32 scale per token and KV head.

A quantized layer cache is a (K, V) pair of `QuantizedKV`, each holding
  data  [num_blocks, block_size, Hkv, D]  int8 or float8_e4m3fn
  scale [num_blocks, block_size, Hkv]     fp32, absmax over D / qmax (127 for int8, 448 for E4M3)
so a stored value is x ≈ data * scale (with head_dim 64: 4 bytes of scale per 64 one-byte values,
1.88x the tokens of a bf16 cache in the same memory, 3.76x of fp32). The scale is per token and head because K/V
magnitudes differ by orders of magnitude between heads and tokens (attention sinks): one scale
per tensor would round small heads to a handful of levels. fp8 carries the scale too: cast
directly, a head of magnitude ~1e-3 falls into E4M3's subnormal range and keeps a bit or two
(>10x the error, tests/test_kv_quant.py). On SmolLM2-135M (fp32, 128 decoded wikitext tokens
after a 128-token prefill) the next-token KL to a full-precision cache was 0.0042 with the scale
and 0.0061 without; int8 gave 0.00055.

Writes quantize on store (`write_kv_quantized`), readers dequantize: the native decode kernel
on the fly inside its dot products, every other path through `QuantizedKV.gather` (plain torch).
A float cache (auto = the model dtype, or float16/bfloat16 under fp32 activations) only takes
`allocate_kv_caches` and the dtype rules from this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import check_kv_cache_dtype
from kiln.kernels.native import load_native

# name → (storage dtype, largest stored magnitude)
_STORAGE: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8_e4m3": (torch.float8_e4m3fn, 448.0),
}
SCALE_DTYPE = torch.float32
_FLOAT_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_quantized_kv(kv_cache_dtype: str) -> bool:
    return check_kv_cache_dtype(kv_cache_dtype) in _STORAGE


def full_precision_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype,
                            device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a float KV cache is stored in.

    'auto' is the model dtype, except for a float32 model on the CPU, whose cache is float16:
    llama.cpp's default KV type, half the memory and half the bytes each decode step's attention
    reads, for a next-token KL of ~4e-7 to an fp32 cache on the default model
    (tests/test_kv_quant.py). The native attention kernel widens the rows to fp32 as it reads them.
    """
    if check_kv_cache_dtype(kv_cache_dtype) == "auto":
        if model_dtype == torch.float32 and torch.device(device).type == "cpu":
            return torch.float16
        return model_dtype
    if kv_cache_dtype not in _FLOAT_STORAGE:
        raise ValueError(f"{kv_cache_dtype!r} is a quantized KV cache dtype, not a float one")
    return _FLOAT_STORAGE[kv_cache_dtype]


def check_kv_cache_for_model(kv_cache_dtype: str, model_dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
    """A float cache must be in the model dtype or be a 16-bit cache under a float32 model."""
    if is_quantized_kv(kv_cache_dtype):
        return
    kv = full_precision_kv_dtype(kv_cache_dtype, model_dtype, device)
    if kv != model_dtype and not (model_dtype == torch.float32 and kv in (torch.float16, torch.bfloat16)):
        raise ValueError(
            f"kv_cache_dtype {kv_cache_dtype} with a {str(model_dtype).removeprefix('torch.')} model is not supported: "
            "use auto (the model dtype), int8 or fp8_e4m3, or float16/bfloat16 under a float32 model"
        )


@dataclass(slots=True)
class QuantizedKV:
    """K or V of one layer, quantized. Invariant: data.shape[:3] == scale.shape."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def raw(self) -> torch.Tensor:
        """The data as an indexable integer tensor (CPU torch has no index kernels for fp8)."""
        return self.data.view(torch.uint8) if self.data.dtype == torch.float8_e4m3fn else self.data

    def gather_blocks(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized blocks `table` (any int shape) → [*table.shape, block_size, Hkv, D] in `dtype`."""
        data = self.raw()[table]
        if self.data.dtype == torch.float8_e4m3fn:
            data = data.view(torch.float8_e4m3fn)
        return dequantize_reference(data, self.scale[table]).to(dtype)

    def gather(self, block_ids: torch.Tensor, seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The first seq_len tokens of one sequence's blocks, dequantized → [seq_len, Hkv, D]."""
        n_blocks = (seq_len + self.data.shape[1] - 1) // self.data.shape[1]
        blocks = self.gather_blocks(block_ids[:n_blocks].long(), dtype)
        return blocks.reshape(-1, self.data.shape[2], self.data.shape[3])[:seq_len]


# One layer's cache: full-precision (K, V) block tensors, or quantized ones.
KVCache = tuple[torch.Tensor, torch.Tensor] | tuple[QuantizedKV, QuantizedKV]


def kv_element_bytes(kv_cache_dtype: str, model_dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[int, int]:
    """(bytes per stored K or V value, bytes of scale per token and KV head) for a cache dtype."""
    if not is_quantized_kv(kv_cache_dtype):
        dtype = full_precision_kv_dtype(kv_cache_dtype, model_dtype, device)
        return torch.empty((), dtype=dtype).element_size(), 0
    return 1, torch.empty((), dtype=SCALE_DTYPE).element_size()


def describe_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: str | torch.device = "cpu") -> str:
    """How values are stored and which path reads them (for the start-up line)."""
    if not is_quantized_kv(kv_cache_dtype):
        stored = str(full_precision_kv_dtype(kv_cache_dtype, model_dtype, device)).removeprefix("torch.")
        return stored if kv_cache_dtype != "auto" else f"auto = {stored}"
    if torch.device(device).type == "cpu" and load_native():
        path = "native decode kernel"
    else:
        path = "dequantize + SDPA reference path"
    return f"{kv_cache_dtype}, fp32 scale per token and head; {path}"


def allocate_kv_caches(
    num_layers: int, shape: tuple[int, int, int, int], kv_cache_dtype: str, model_dtype: torch.dtype, device
) -> list[tuple[torch.Tensor, torch.Tensor] | tuple[QuantizedKV, QuantizedKV]]:
    """Zeroed per-layer (K, V) caches of block shape [num_blocks, block_size, Hkv, D]."""
    check_kv_cache_for_model(kv_cache_dtype, model_dtype, device)
    if not is_quantized_kv(kv_cache_dtype):
        dtype = full_precision_kv_dtype(kv_cache_dtype, model_dtype, device)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(num_layers)]
    storage, _ = _STORAGE[kv_cache_dtype]

    def one() -> QuantizedKV:
        return QuantizedKV(torch.zeros(shape, dtype=storage, device=device),
                           torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device))

    return [(one(), one()) for _ in range(num_layers)]


def quantize_reference(x: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] → (data [..., D] in `storage`, fp32 scale [...]): symmetric absmax over the last dim.

    An all-zero row gets scale 0 (and zero data). Values are clamped to the storage range before
    the cast, so nothing saturates to NaN.
    """
    qmax = 127.0 if storage == torch.int8 else 448.0
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (xf / safe.unsqueeze(-1)).clamp(-qmax, qmax)
    data = y.round().to(torch.int8) if storage == torch.int8 else y.to(torch.float8_e4m3fn)
    return data, scale


def dequantize_reference(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(data [..., D], scale [...]) → fp32 [..., D]."""
    return data.float() * scale.unsqueeze(-1)


def write_kv_quantized(
    k: torch.Tensor, v: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV, slot_mapping: torch.Tensor
) -> None:
    """Quantize this step's K/V [T, Hkv, D] into their slots (one native call each where available)."""
    if k.device.type == "cpu" and load_native():
        torch.ops.kiln.write_kv_quant(k, k_cache.data, k_cache.scale, slot_mapping)
        torch.ops.kiln.write_kv_quant(v, v_cache.data, v_cache.scale, slot_mapping)
        return
    for x, cache in ((k, k_cache), (v, v_cache)):
        write_kv_quantized_reference(x, cache, slot_mapping)


def write_kv_quantized_reference(x: torch.Tensor, cache: QuantizedKV, slot_mapping: torch.Tensor) -> None:
    """Plain-torch twin of the native `write_kv_quant`."""
    data, scale = quantize_reference(x, cache.data.dtype)
    raw = cache.raw()
    if data.dtype == torch.float8_e4m3fn:
        data = data.view(torch.uint8)
    raw.view(-1, raw.shape[2], raw.shape[3]).index_copy_(0, slot_mapping, data)
    cache.scale.view(-1, cache.scale.shape[2]).index_copy_(0, slot_mapping, scale)
