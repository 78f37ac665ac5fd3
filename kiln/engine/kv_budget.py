"""How many KV blocks fit in the memory budget, and the start-up line that says so."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kiln.config import CacheConfig, ModelConfig
from kiln.kernels.kv_quant import check_kv_cache_for_model, describe_kv_cache_dtype, kv_element_bytes


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def parse_memory(text: str | int | None, label: str = "kv cache memory") -> int | None:
    """'2GiB', '512MiB', '1.5G', '1000000' → bytes (`label` names the option in the error)."""
    if text is None or isinstance(text, int):
        return text
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(float(s))
    except ValueError:
        raise ValueError(f"{label} must look like 2GiB, 512MiB or a byte count; got {text!r}") from None


@dataclass(frozen=True)
class KVBudget:
    num_blocks: int
    block_size: int
    bytes_total: int
    max_model_len: int
    kv_cache_dtype: str = "auto"
    storage: str = ""  # how the cache is stored and read (describe_kv_cache_dtype)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        concurrency = self.num_tokens / self.max_model_len
        label = f" ({self.storage})" if self.storage else ""
        return (
            f"KV cache{label}: {self.num_blocks} blocks = {self.num_tokens} tokens = {self.bytes_total / (1 << 30):.2f} GiB, "
            f"max concurrency at full context ({self.max_model_len} tokens) = {concurrency:.2f}"
        )


def kv_bytes_per_token(model_cfg: ModelConfig, kv_cache_dtype: str, model_dtype: torch.dtype,
                       device: str = "cpu") -> int:
    """Bytes of K+V one token occupies across all layers, scales of a quantized cache included."""
    value_bytes, scale_bytes = kv_element_bytes(kv_cache_dtype, model_dtype, device)
    per_head = model_cfg.head_dim * value_bytes + scale_bytes
    return 2 * model_cfg.num_hidden_layers * model_cfg.num_key_value_heads * per_head


def plan_kv_cache(
    model_cfg: ModelConfig, cache_cfg: CacheConfig, kv_dtype: torch.dtype, max_model_len: int, device: str = "cpu"
) -> KVBudget:
    """Blocks that fit the budget. `kv_dtype` is the model dtype ('auto' stores it, or float16 under
    a float32 model on the CPU: kv_quant.full_precision_kv_dtype); a quantized
    `cache_cfg.kv_cache_dtype` stores 1 byte per value plus its scales."""
    check_kv_cache_for_model(cache_cfg.kv_cache_dtype, kv_dtype, device)
    per_token = kv_bytes_per_token(model_cfg, cache_cfg.kv_cache_dtype, kv_dtype, device)
    per_block = per_token * cache_cfg.block_size
    budget = cache_cfg.kv_cache_memory
    if budget is None:
        budget = min(int(available_memory_bytes() * cache_cfg.kv_cache_fraction), cache_cfg.kv_cache_max_default)
    num_blocks = budget // per_block
    if num_blocks < 2:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds {num_blocks} blocks of {per_block} bytes; give at least {2 * per_block}"
        )
    return KVBudget(int(num_blocks), cache_cfg.block_size, int(num_blocks * per_block), max_model_len,
                    cache_cfg.kv_cache_dtype, describe_kv_cache_dtype(cache_cfg.kv_cache_dtype, kv_dtype, device))
