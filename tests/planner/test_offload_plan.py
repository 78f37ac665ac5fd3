"""`kiln plan --max-weight-memory` splits the weights as the engine's offload does (kiln.offload)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.loader.model_loader import load_model
from kiln.offload.weight_offload import WeightOffloadConfig, linear_tensors, model_weight_tensors, unique_bytes
from kiln.planner.memory import PlanRequest
from kiln.planner.plan_cmd import run_plan


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from loader.tiny_model import TinySpec, make_checkpoint, write_gguf

    ckpt = make_checkpoint(TinySpec(tied=True, layers=6), seed=5)
    # every layer matrix in Q8_0 blocks: the engine holds blocks as stored, so plan and engine count the same
    # bytes (an F16 matrix would be widened to the fp32 compute dtype, which the plan does not model)
    for name, (raw, qtype) in list(ckpt.gguf_raw.items()):
        if qtype == Q.F16 and raw.ndim == 2:
            ckpt.gguf_raw[name] = (quantize(raw.astype(np.float32), Q.Q8_0), Q.Q8_0)
    return write_gguf(ckpt, tmp_path_factory.mktemp("plan-offload") / "tied6.gguf")


@pytest.mark.parametrize("resident_layers", [0, 2, 5])
def test_planned_split_matches_the_engines(tiny_file, resident_layers, tmp_path) -> None:
    lean = load_model(tiny_file, "float32", quantized_weights="native",
                      weight_offload=WeightOffloadConfig(1 << 40, tmp_path))  # a budget that never binds
    layers = [unique_bytes([t for _, _, t in linear_tensors(layer)]) for layer in lean.model.layers]
    fixed = unique_bytes(model_weight_tensors(lean.model)) - sum(layers)
    budget = fixed + sum(layers[:resident_layers]) + layers[0] // 2  # half a layer of slack: no rounding flips
    engine = load_model(tiny_file, "float32", weight_offload=WeightOffloadConfig(budget, tmp_path)).offload
    plan = run_plan(str(tiny_file), PlanRequest(context=256, max_weight_memory=budget), memory=1 << 30).plan.whole
    assert len(engine.resident_layers) == resident_layers
    assert plan.mapped_weight_bytes == pytest.approx(sum(layers[resident_layers:]), rel=0.02)
    assert plan.weights_bytes == pytest.approx(engine.resident_bytes, rel=0.05)
    assert any(f"{6 - resident_layers} of 6 decoder layers" in n for n in plan.notes)


def test_a_budget_below_the_fixed_part_is_refused_by_plan_and_engine(tiny_file, tmp_path) -> None:
    from kiln.errors import ModelLoadError

    with pytest.raises(ValueError, match="must stay resident"):
        run_plan(str(tiny_file), PlanRequest(context=256, max_weight_memory=1024), memory=1 << 30)
    with pytest.raises(ModelLoadError, match="must stay resident"):
        load_model(tiny_file, "float32", weight_offload=WeightOffloadConfig(1024, tmp_path))
