"""Fixtures the quantization tests share: one torch thread, the tiny random models, a calibration text."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader.tiny_model import TinyModels, build_tiny_models, one_torch_thread

WORDS = "the of and a to in is was that for on with as by at from his her it an be this which or had not".split()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    return path
