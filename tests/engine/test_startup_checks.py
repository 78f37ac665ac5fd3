"""Impossible configurations are refused at start-up with one line naming the option and the limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.config import CacheConfig, ModelConfig, SchedulerConfig
from kiln.engine import startup_checks


def _config(context: int = 8192) -> ModelConfig:
    return ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, max_position_embeddings=context)


def test_context_longer_than_the_model_is_refused() -> None:
    model = _config()
    with pytest.raises(ValueError, match=r"--max-model-len 9000 is longer than the model's context of 8192"):
        startup_checks.check_context_length(SchedulerConfig(max_model_len=9000), model)
    startup_checks.check_context_length(SchedulerConfig(max_model_len=8192), model)  # equal is fine
    startup_checks.check_context_length(SchedulerConfig(), model)


def test_kv_budget_larger_than_free_memory_is_refused() -> None:
    with pytest.raises(ValueError, match=r"--kv-cache-memory 8.00 GiB is more than the 4.00 GiB of memory free"):
        startup_checks.check_kv_cache_memory(CacheConfig(kv_cache_memory=8 << 30), "cpu", available=4 << 30)
    startup_checks.check_kv_cache_memory(CacheConfig(kv_cache_memory=1 << 30), "cpu", available=4 << 30)
    startup_checks.check_kv_cache_memory(CacheConfig(), "cpu", available=1)  # the default budget is a share of what is free


@pytest.mark.parametrize("block_size, says", [(0, "positive"), (9000, "longer than the context")])
def test_bad_block_sizes_are_refused(block_size: int, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        startup_checks.check_block_size(CacheConfig(block_size=block_size), 8192)


def test_scheduler_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--max-num-seqs"):
        startup_checks.check_scheduler(SchedulerConfig(max_num_seqs=0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def test_the_engine_refuses_before_serving(tiny) -> None:
    from kiln import LLM

    gguf: Path = tiny.gguf["tied"]
    with pytest.raises(ValueError, match="longer than the model's context of 256"):
        LLM(str(gguf), dtype="float32", max_model_len=100_000)
    with pytest.raises(ValueError, match="--kv-cache-memory .* is more than"):
        LLM(str(gguf), dtype="float32", kv_cache_memory=1 << 50)
