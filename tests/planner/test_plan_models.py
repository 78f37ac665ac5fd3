"""`kiln plan` on real files: the tiny random GGUF / HF folders the loader tests build, and the default model.

Each figure is checked against what the file or kiln's own engine arithmetic says, not against itself.
"""

from __future__ import annotations

import json

import pytest

from kiln.planner.memory import PlanRequest
from kiln.planner.plan_cmd import run_plan

JSON_KEYS = {"weights_bytes", "kv_cache_bytes", "activations_bytes", "total_bytes", "fits", "per_rank"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def test_plan_of_the_tiny_gguf_matches_its_tensors_and_the_engine_kv(tiny) -> None:
    import gguf

    path = tiny.gguf["tied"]
    result = run_plan(str(path), PlanRequest(context=256, quantized_weights="native"), memory=1 << 30)
    a = result.plan.source.arch
    spec = tiny.tied.spec
    assert (a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (
        spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.head_dim)
    on_disk = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    weights = result.plan.whole.weights
    assert sum(v for k, v in weights.items() if k != "kiln runtime copies") == on_disk
    # tests/engine/test_kv_capacity.py: 256 bytes of fp16 K+V per token on this model
    assert result.plan.whole.kv_per_token_bytes == 256
    assert result.fits is True


def test_plan_of_hf_folder_and_bare_config_json(tiny) -> None:
    folder = tiny.hf["untied"]
    by_folder = run_plan(str(folder), PlanRequest(weights="fp32", context=128), memory=None)
    by_config = run_plan(str(folder / "config.json"), PlanRequest(weights="fp32", context=128), memory=None)
    assert by_folder.plan.whole.as_dict() == by_config.plan.whole.as_dict()
    a = by_folder.plan.source.arch
    assert not a.tie_word_embeddings and by_folder.plan.whole.weights["lm_head"] == a.vocab_size * a.hidden_size * 4


def test_cli_json_has_the_documented_keys_and_a_verdict(tiny, capsys) -> None:
    from kiln.entrypoints.cli_plan import main

    assert main(["plan", str(tiny.gguf["tied"]), "--context", "256", "--memory", "1KiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= set(out) and JSON_KEYS - {"fits", "per_rank"} <= set(out["per_rank"])
    assert out["fits"] is False and out["total_bytes"] > 1024
    assert main(["plan", "llama-3-70b", "--weights", "bf16", "--context", "4096", "--device", "cuda",
                 "--memory", "80GiB", "--json"]) == 0
    big = json.loads(capsys.readouterr().out)
    assert big["fits"] is False and big["kv_cache_bytes"] == 1_342_177_280
    changes = [f["change"] for f in big["fixes"]]
    assert "tensor parallel 2" in changes and "weights int8" in changes
    assert all(f["total_bytes"] <= 80 << 30 for f in big["fixes"])


def test_unknown_model_is_one_clear_error(capsys) -> None:
    from kiln.entrypoints.cli_plan import main

    assert main(["plan", "no-such-model-anywhere"]) == 2
    assert "neither a file/folder nor a known model" in capsys.readouterr().err


@pytest.mark.real_model
def test_plan_of_the_default_model_agrees_with_the_engine(default_gguf_path) -> None:
    import torch

    from kiln.config import CacheConfig
    from kiln.engine.kv_budget import kv_bytes_per_token, plan_kv_cache
    from kiln.loader.model_loader import load_model

    result = run_plan(str(default_gguf_path), PlanRequest(context=2048, concurrency=4), memory=None)
    w = result.plan.whole.weights
    assert (w["embeddings"], w["attention"], w["mlp"]) == (30_081_024, 16_588_800, 49_766_400)  # the file's Q8_0/Q4_1
    cfg = load_model(default_gguf_path, "float32").config
    assert result.plan.whole.kv_per_token_bytes == kv_bytes_per_token(cfg, "auto", torch.float32)
    int8 = run_plan(str(default_gguf_path), PlanRequest(context=2048, kv_cache_dtype="int8"), memory=None)
    assert int8.plan.whole.kv_per_token_bytes == kv_bytes_per_token(cfg, "int8", torch.float32)
    # the engine's own pool for this budget holds exactly context x concurrency tokens
    budget = plan_kv_cache(cfg, CacheConfig(kv_cache_memory=result.plan.whole.kv_cache_bytes), torch.float32, 2048)
    assert budget.num_tokens == 2048 * 4
