"""Shared fixtures. The real default model is pulled once into the kiln cache on first use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores here: keep torch from oversubscribing when pytest runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Kernel choice by the built-in crossovers, not by a `kiln tune` file this machine may hold: tests that
# check which kernel runs at which batch size must not depend on a developer's earlier tuning
# (tests/test_tune.py sets its own).
os.environ.setdefault("KILN_NO_TUNE", "1")

@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from kiln.hub import pull

    return pull("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Gemma 3 (tests/models/tiny_gemma3.py) as a GGUF file, built once per session."""
    pytest.importorskip("transformers", reason="the tiny Gemma 3 is built with transformers")
    from models.tiny_gemma3 import build

    return build(tmp_path_factory.mktemp("tiny-gemma3-shared")).gguf


@pytest.fixture(scope="session")
def llm_fp32(default_gguf_path: Path):
    """The real default model in fp32 (the precision the reference comparisons use)."""
    from kiln import LLM

    return LLM(str(default_gguf_path), dtype="float32", kv_cache_memory="256MiB", quantized_weights="dequantize")


@pytest.fixture(scope="session")
def hf_reference(default_gguf_path: Path):
    """transformers loading the same GGUF (dequantized to fp32): the reference implementation."""
    transformers = pytest.importorskip("transformers", reason="reference tests need the test extras")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf_path.parent), gguf_file=default_gguf_path.name, dtype=torch.float32
    )
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_gguf_path.parent), gguf_file=default_gguf_path.name)
    return model, tokenizer


@pytest.fixture(autouse=True)
def _kernel_switches_per_test():
    """Each engine installs its kernel switches process-wide (kiln.kernels.switches.configure); put
    the previous ones back after every test so one test's `LLM(fused_decode_step=False)` cannot
    change which kernels a later test runs."""
    from kiln.kernels import switches

    before = switches._active
    yield
    switches._active = before


@pytest.fixture(autouse=True)
def _activation_bits_per_test():
    """Kernel tests that measure 8-bit activations set the process-wide activation quantization; every test
    ends at kiln's 16 bits so no later test runs at a precision an earlier one chose."""
    from kiln.kernels import quant_matmul

    yield
    if quant_matmul.activation_bits() != 16:
        quant_matmul.set_activation_bits(16)
