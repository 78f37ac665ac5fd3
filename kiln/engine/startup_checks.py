"""Configurations that cannot work are refused when the engine starts, one line each, instead of
failing on the first request (or worse, on the thousandth, when the KV cache finally fills).

Each check raises ValueError whose message names the option, the value, the limit and what to do.
kiln's attention kernels take any block size (the prefill kernel gathers keys through the block
table into its own 32-key tiles; tests run block sizes 2, 4 and 16), so there is no block-size/tile
constraint to check: a block size is refused only when it is not positive or exceeds the context.
"""

from __future__ import annotations

import torch

from kiln.config import CacheConfig, ModelConfig, SchedulerConfig

_GIB = 1 << 30


def free_device_memory_bytes(device: str) -> int:
    """Memory a KV cache could take on `device`: MemAvailable on the CPU, free memory on a GPU."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    from kiln.engine.kv_budget import available_memory_bytes

    return available_memory_bytes()


def check_context_length(scheduler: SchedulerConfig, model: ModelConfig) -> None:
    """--max-model-len may shorten the model's context, never lengthen it (RoPE positions past the
    trained length give garbage, silently)."""
    asked = scheduler.max_model_len
    if asked is not None and asked > model.max_position_embeddings:
        raise ValueError(
            f"--max-model-len {asked} is longer than the model's context of {model.max_position_embeddings} "
            f"tokens; give at most {model.max_position_embeddings} (or leave it out to use the model's)"
        )
    if asked is not None and asked < 2:
        raise ValueError(f"--max-model-len must be at least 2 tokens (a prompt token and an output); got {asked}")


def check_kv_cache_memory(cache: CacheConfig, device: str, available: int | None = None) -> None:
    """An explicit --kv-cache-memory must fit the memory the device has free now (the default budget
    is a fraction of it, so it always does)."""
    if cache.kv_cache_memory is None:
        return
    free = free_device_memory_bytes(device) if available is None else available
    if cache.kv_cache_memory > free:
        raise ValueError(
            f"--kv-cache-memory {cache.kv_cache_memory / _GIB:.2f} GiB is more than the {free / _GIB:.2f} GiB of "
            f"memory free on {device} (the model's weights come on top); give less, e.g. "
            f"--kv-cache-memory {max(free // 4, 1 << 20) / _GIB:.2f}GiB"
        )


def check_block_size(cache: CacheConfig, max_model_len: int) -> None:
    if cache.block_size < 1:
        raise ValueError(f"--block-size must be a positive number of tokens; got {cache.block_size}")
    if cache.block_size > max_model_len:
        raise ValueError(f"--block-size {cache.block_size} is longer than the context ({max_model_len} tokens); "
                         "give at most the context length (16 is the default)")


def check_scheduler(scheduler: SchedulerConfig) -> None:
    if scheduler.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be at least 1; got {scheduler.max_num_seqs}")
    if scheduler.max_num_batched_tokens < 1:
        raise ValueError(f"--max-num-batched-tokens must be at least 1; got {scheduler.max_num_batched_tokens}")


def check_startup(model: ModelConfig, cache: CacheConfig, scheduler: SchedulerConfig, device: str) -> None:
    """Every start-up check, in the order a user would fix them."""
    check_context_length(scheduler, model)
    check_scheduler(scheduler)
    check_kv_cache_memory(cache, device)
    check_block_size(cache, scheduler.max_model_len or model.max_position_embeddings)
