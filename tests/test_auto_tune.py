"""The engine's first start on an untuned machine measures the kernel crossovers once (kiln.tuning.auto_tune).

`measure` itself is tests/test_tune.py's and `kiln tune`'s; here a stand-in records the call and saves a
tuning as it would, so the test checks when the engine tunes, on what, and that later starts do not."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.kernels import tune
from kiln.tuning.auto_tune import ensure_tuned
from kiln.kernels.native import load_native


@pytest.fixture
def untuned_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if not load_native():
        pytest.skip("kiln's native kernels are not built here (no C++ compiler): nothing to tune")
    monkeypatch.setenv("KILN_HOME", str(tmp_path))  # no models, no tuning files; the loaded library stays
    monkeypatch.delenv("KILN_NO_TUNE", raising=False)
    monkeypatch.delenv("KILN_NO_AUTO_TUNE", raising=False)
    tune._load.cache_clear()
    yield tmp_path
    tune._load.cache_clear()


@pytest.fixture
def recorded_measure(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    calls: list[tuple[str, int, int]] = []

    def fake_measure(model: str, threads: int, rounds: int, *args, **kwargs) -> dict:
        calls.append((model, threads, rounds))
        c = {"block_max_rows": 4, "panel_rows": [5, 64], "dense_from": 65}
        result = {"fingerprint": tune.fingerprint(threads), "date": "test", "fp32_dense_copy": "float32",
                  "crossovers": {"float32": {"resident": c, "no_resident": c},
                                 "bfloat16": {"resident": c, "no_resident": c}}}
        tune.save(result)
        return result

    monkeypatch.setattr("kiln.tuning.kernel_tune.measure", fake_measure)
    return calls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("auto-tune-models"))


def test_first_start_tunes_on_the_served_model_then_never_again(untuned_home, recorded_measure, tiny) -> None:
    path = tiny.gguf["untied"]  # Q4_0 / Q4_1 linears
    assert tune.load_tuning(2) is None
    assert ensure_tuned(path, 2, log=lambda s: None).startswith("tuned now")
    assert recorded_measure == [(str(path), 2, 1)]
    assert tune.load_tuning(2) is not None
    assert ensure_tuned(path, 2, log=lambda s: None) == "tuned already"
    assert ensure_tuned(path, 1, log=lambda s: None).startswith("tuned now")  # another thread count: its own file
    assert len(recorded_measure) == 2


def test_nothing_to_time_is_said_not_guessed(untuned_home, recorded_measure, tiny) -> None:
    messages: list[str] = []
    # the tied tiny model's linears are F16 / Q8_0, and the default model is not in this empty cache
    why = ensure_tuned(tiny.gguf["tied"], 2, log=messages.append)
    assert why.startswith("not tuned") and "kiln tune" in why and messages == [why]
    assert recorded_measure == [] and tune.load_tuning(2) is None


def test_the_engine_tunes_at_start_unless_told_not_to(untuned_home, recorded_measure, tiny, monkeypatch) -> None:
    from kiln import LLM

    LLM(str(tiny.gguf["untied"]), dtype="float32", kv_cache_memory=1 << 20, auto_tune=False)
    monkeypatch.setenv("KILN_NO_AUTO_TUNE", "1")
    LLM(str(tiny.gguf["untied"]), dtype="float32", kv_cache_memory=1 << 20)
    assert recorded_measure == []
    monkeypatch.delenv("KILN_NO_AUTO_TUNE")
    LLM(str(tiny.gguf["untied"]), dtype="float32", kv_cache_memory=1 << 20)
    assert [model for model, _, _ in recorded_measure] == [str(tiny.gguf["untied"])]
