"""Shared fixtures. The real default model is pulled once into the kiln cache on first use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores here: keep torch from oversubscribing when pytest runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from kiln.hub import pull

    return pull("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"evaluation data not found at {SHARED_DATA}; the tests expect ../shared/data next to the repo")
    return SHARED_DATA
