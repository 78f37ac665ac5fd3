"""`kiln tune`: crossovers from measured times, the engine taking them up, and a real (tiny) measurement.

The regime fit is checked on made-up timings whose right answer is known by construction; the
measurement runs the real kernels on the tiny GGUF and must produce a file the linears then follow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.kernels import tune
from kiln.kernels.native import load_native
from kiln.layers.gguf_quant import GGUFQuantLinearMethod

from loader.tiny_model import TinyModels, build_tiny_models

ROWS = (1, 2, 4, 8, 16, 32, 64)


def synthetic(block_until: int, panel_until: int, flip_at: int | None = None) -> dict[str, dict[str, float]]:
    """Times where the block kernel is fastest up to `block_until`, the panel kernel up to `panel_until`
    and the dense GEMM above, each winner 20 % ahead; at `flip_at` the block kernel wins by 1 % (noise)."""
    times = {}
    for m in ROWS:
        base = {"block": 2.0, "panel": 2.0, "resident": 2.0, "dequantize": 3.0}
        winner = "block" if m <= block_until else "panel" if m <= panel_until else "resident"
        base[winner] = 1.0
        if m == flip_at:
            base["block"] = base[winner] * 0.99
        times[str(m)] = {k: v * m for k, v in base.items()}
    return times


def test_crossovers_find_the_regimes() -> None:
    c = tune.crossovers(synthetic(4, 16), ROWS, resident=True)
    assert c == {"block_max": 4, "panel": [8, 16]}


def test_crossovers_ignore_a_one_m_flip() -> None:
    # the block kernel "winning" by 1 % at one M inside the panel's range must not split the regimes
    assert tune.crossovers(synthetic(2, 32, flip_at=16), ROWS, resident=True) == {"block_max": 2, "panel": [4, 32]}


def test_crossovers_without_panel_or_resident_copy() -> None:
    times = synthetic(8, 8)
    for t in times.values():
        del t["panel"]
    assert tune.crossovers(times, ROWS, resident=True) == {"block_max": 8, "panel": [0, 0]}
    # without a resident copy the fallback is dequantize (3x): the block kernel keeps every M here
    assert tune.crossovers(times, ROWS, resident=False)["block_max"] == 64


def _write_tuning(block: int, panel: tuple[int, int], dense_copy: str = "float32") -> Path:
    fp = tune.fingerprint(torch.get_num_threads())
    c = {"block_max": block, "panel": list(panel)}
    data = {"fingerprint": fp, "date": "test", "crossovers": {"float32": {"resident": c, "no_resident": c},
                                                             "bfloat16": {"resident": c, "no_resident": c}},
            "fp32_dense_copy": dense_copy}
    path = tune.tune_file(fp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    tune._load.cache_clear()
    return path


@pytest.fixture
def tuned_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if not load_native():
        pytest.skip("kiln's native kernels are not built here (no C++ compiler): nothing to tune")
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("KILN_NO_TUNE", raising=False)
    tune._load.cache_clear()
    yield tmp_path
    tune._load.cache_clear()


def test_linears_follow_this_machines_tuning(tuned_home: Path) -> None:
    assert tune.load_tuning() is None  # nothing measured here yet: the built-in crossovers
    untuned = GGUFQuantLinearMethod("Q4")
    _write_tuning(block=3, panel=(4, 40))
    method = GGUFQuantLinearMethod("Q4")
    assert (method.block_max_rows(torch.float32), method.panel_max_rows(torch.float32)) == (3, 40)
    assert (method.block_max_rows(torch.bfloat16), method.panel_max_rows(torch.bfloat16)) == (3, 0)
    assert "tuned here" in method.name and "tuned here" not in untuned.name
    # an explicit choice (tests, callers that measured for themselves) wins over the file
    explicit = GGUFQuantLinearMethod("Q4", dense_threshold=7, panel_rows=(0, 0))
    assert explicit.block_max_rows(torch.float32) == 7


def test_dense_copy_dtype_choice() -> None:
    times = {"128": {"resident": 10.0, "resident_bf16": 8.0}}
    assert tune.dense_copy_dtype(times, (128,)) == "bfloat16"
    times["128"]["resident_bf16"] = 9.5  # within 10 %: not worth the rounding
    assert tune.dense_copy_dtype(times, (128,)) == "float32"


def test_a_bf16_dense_copy_runs_prefill_in_bf16(tuned_home: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With `kiln tune` having chosen a bf16 copy, an fp32 model's block layers keep their dense copy in bf16
    and run large batches as bf16 GEMMs (casts in and out); small batches still run the exact blocks."""
    from kiln.kernels.quant_matmul import dequantize, quant_matmul
    from kiln.loader.model_loader import load_model

    tiny: TinyModels = build_tiny_models(tmp_path_factory.mktemp("tune-bf16"))
    _write_tuning(block=2, panel=(0, 0), dense_copy="bfloat16")
    model = load_model(tiny.gguf["untied"], dtype="float32").model
    layers = [m for m in model.modules() if isinstance(getattr(m, "method", None), GGUFQuantLinearMethod)
              and m.dense_weight is not None and not isinstance(m.dense_weight, torch.nn.Parameter)]
    assert layers and all(m.dense_weight.dtype == torch.bfloat16 for m in layers)
    layer = layers[0]
    x = torch.randn(16, layer.input_size)
    exact = dequantize(layer.qs, layer.d, layer.m, layer.method.is_q4, torch.float32)
    expected = torch.nn.functional.linear(x.to(torch.bfloat16), exact.to(torch.bfloat16)).float()
    if layer.bias is not None:
        expected = expected + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert torch.equal(layer(x[:1]), quant_matmul(x[:1], layer.qs, layer.d, layer.m, layer.method.is_q4)
                       + (layer.bias if layer.bias is not None else 0))


def test_a_tuning_of_another_machine_is_not_used(tuned_home: Path) -> None:
    path = _write_tuning(block=3, panel=(4, 40))
    data = json.loads(path.read_text())
    data["fingerprint"]["cpu"] = "another CPU"
    other = tune.tune_file(data["fingerprint"])
    path.rename(other)
    tune._load.cache_clear()
    assert tune.load_tuning() is None


def test_kiln_tune_measures_and_the_engine_follows(tuned_home: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny: TinyModels = build_tiny_models(tmp_path_factory.mktemp("tune-tiny"))
    from kiln.tuning.kernel_tune import measure

    result = measure(str(tiny.gguf["untied"]), threads=1, rounds=1, rows=(1, 4, 16))
    assert result["linears"] > 0
    for dtype in ("float32", "bfloat16"):
        assert set(result["seconds_per_step"][dtype]) == {"1", "4", "16"}
        for by_path in result["seconds_per_step"][dtype].values():
            assert {"block", "resident", "dequantize"} <= set(by_path) and all(v > 0 for v in by_path.values())
    with_torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = tune.load_tuning()
        assert loaded is not None and loaded["crossovers"] == result["crossovers"]
        method = GGUFQuantLinearMethod("Q4")
        expected = tune.limits(result, torch.float32, False)
        assert (method.block_max_rows(torch.float32), method.panel_max_rows(torch.float32)) == expected
    finally:
        torch.set_num_threads(with_torch_threads)
