"""`--max-weight-memory`: decoder layers streamed from a memory-mapped file give the resident model's outputs.

The reference is the same file loaded fully resident with the same kernels (`quantized_weights="native"`:
blocks without dense copies, which is what an offloaded model keeps). Outputs are compared exactly (token
ids and top-5 logprobs), since only where the bytes live changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.entrypoints.llm import LLM
from kiln.errors import ModelLoadError
from kiln.loader.model_loader import load_model
from kiln.offload.spill_file import mapping_rss
from kiln.offload.weight_offload import (
    WeightOffloadConfig, linear_tensors, model_weight_tensors, unique_bytes,
)
from kiln.sampling_params import SamplingParams

PROMPTS = ["the cat sat on the mat", "hello world " * 6, "he sat in the hat"]
LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from loader.tiny_model import TinySpec, make_checkpoint, write_gguf

    root = tmp_path_factory.mktemp("offload-models")
    return {"tied": write_gguf(make_checkpoint(TinySpec(tied=True, layers=LAYERS), seed=3), root / "tied.gguf"),
            "untied": write_gguf(make_checkpoint(TinySpec(tied=False, layers=LAYERS), seed=4), root / "untied.gguf")}


def _budget_for(path: Path, resident_layers: int) -> int:
    """Bytes that keep the fixed part plus `resident_layers` layers in RAM (measured on a lean load)."""
    loaded = load_model(path, "float32", quantized_weights="native",
                        weight_offload=WeightOffloadConfig(1 << 40, Path("/nonexistent")))  # budget never binds
    layers = [unique_bytes([t for _, _, t in linear_tensors(layer)]) for layer in loaded.model.layers]
    total = unique_bytes(model_weight_tensors(loaded.model))
    return total - sum(layers) + sum(layers[:resident_layers]) + 1


def _generate(path: Path, **kwargs):
    from loader.tiny_model import one_torch_thread

    params = SamplingParams(max_tokens=12, temperature=0, logprobs=5)
    with one_torch_thread():
        llm = LLM(str(path), dtype="float32", kv_cache_memory=1 << 20, max_num_batched_tokens=64, **kwargs)
        outs = llm.generate(PROMPTS, params)
        engine = llm.engine
        assert engine.kv_manager.get_num_free_blocks() == engine.kv_budget.num_blocks  # nothing leaked
    result = [(o.outputs[0].token_ids, [sorted(lp.items()) for lp in o.outputs[0].logprobs]) for o in outs]
    return result, llm


def _logprob_values(result):
    return [lps for _, lps in result]  # [(token id, logprob float)] per step, sorted by token id


@pytest.mark.parametrize("variant", ["tied", "untied"])
@pytest.mark.parametrize("mode", [{}, {"offload_drop_page_cache": True}, {"offload_read_ahead": True}])
def test_streamed_layers_give_the_resident_outputs(models, variant, mode, tmp_path) -> None:
    reference, _ = _generate(models[variant], quantized_weights="native")
    budget = _budget_for(models[variant], resident_layers=1)
    streamed, llm = _generate(models[variant], max_weight_memory=budget, offload_dir=str(tmp_path), **mode)
    engine = llm.engine
    report = engine.loaded.offload
    assert report.resident_layers == [0] and report.spilled_layers == [1, 2, 3]
    assert [ids for ids, _ in streamed] == [ids for ids, _ in reference]
    assert _logprob_values(streamed) == _logprob_values(reference)
    assert "stream from disk" in engine.loaded.model.decode_plan_status
    assert list(tmp_path.iterdir()) == []  # the spill file is unlinked: nothing outlives the process


def test_resident_bytes_stay_within_the_budget_and_streamed_pages_leave(models, tmp_path) -> None:
    budget = _budget_for(models["tied"], resident_layers=1)
    _, llm = _generate(models["tied"], max_weight_memory=budget, offload_dir=str(tmp_path))
    model, report = llm.engine.loaded.model, llm.engine.loaded.offload
    spill = model.weight_streamer.spill
    start, end = spill._bytes.data_ptr(), spill._bytes.data_ptr() + spill.size
    outside = [t for t in model_weight_tensors(model) if not start <= t.data_ptr() < end]
    assert unique_bytes(outside) == report.resident_bytes <= budget
    assert report.embedding_from_blocks  # the tied Q8_0 table is served from the head's blocks
    assert report.mapped_bytes >= sum(unique_bytes([t for _, _, t in linear_tensors(model.layers[i])])
                                      for i in report.spilled_layers)
    assert spill.resident_bytes() == 0  # every streamed layer was released after it ran
    # negative control: without the release hooks the pages a step touched stay in the resident set
    model.weight_streamer.remove()
    llm.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0))
    assert spill.resident_bytes() > 0
    assert mapping_rss(spill._bytes.data_ptr()) == spill.resident_bytes()


def test_a_budget_below_the_fixed_part_is_one_clear_error(models, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="must stay resident"):
        LLM(str(models["tied"]), dtype="float32", max_weight_memory=1024, offload_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--max-weight-memory must look like"):
        LLM(str(models["tied"]), dtype="float32", max_weight_memory="lots")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_embedding_rows_equal_the_dequantized_table(qtype) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from kiln.layers.gguf_quant import GGUFQuantizedTensor, block_method, family_of
    from kiln.layers.linear import Linear
    from kiln.offload.block_embedding import BlockEmbedding

    rng = np.random.default_rng(0)
    vocab, hidden = 96, 64
    raw = quantize(rng.standard_normal((vocab, hidden)).astype(np.float32), GGMLQuantizationType[qtype])
    blocks = GGUFQuantizedTensor(qtype, torch.from_numpy(np.ascontiguousarray(raw)), hidden)
    head = Linear(hidden, [vocab], dtype=torch.float32, device=torch.device("cpu"))
    head.set_method(block_method(family_of({qtype}), keep_dense=False))
    head.weight_loader("weight", blocks)
    table = blocks.dequantize()  # what nn.Embedding holds (the gguf library's values)
    ids = torch.tensor([[0, 5, 95], [7, 7, 1]])
    assert torch.equal(BlockEmbedding(head, torch.float32)(ids), table[ids])


def test_self_draft_speculation_runs_under_a_budget(models, tmp_path) -> None:
    """The int4 self-draft once shared the target's embedding, which under a budget is the head's blocks
    (no dense table for the draft's tied head to read); greedy speculation must equal plain decoding."""
    reference, _ = _generate(models["tied"], quantized_weights="native")
    budget = _budget_for(models["tied"], resident_layers=1)
    drafted, _ = _generate(models["tied"], max_weight_memory=budget, offload_dir=str(tmp_path),
                           speculative_model="self:int4", num_speculative_tokens=3,
                           speculative_disable_by_batch_size=8, speculative_adaptive=False)
    assert [ids for ids, _ in drafted] == [ids for ids, _ in reference]


def test_a_non_contiguous_parameter_moves_and_keeps_its_identity(tmp_path) -> None:
    from torch import nn

    from kiln.offload.weight_offload import _move
    from kiln.offload.spill_file import SpillFile

    module = nn.Linear(4, 6, bias=False)
    module.weight = nn.Parameter(torch.randn(4, 6).t(), requires_grad=False)  # a transposed view
    param, values = module.weight, module.weight.detach().clone()
    spill = SpillFile(4096, tmp_path)
    _move(module, "weight", param, spill.tensor(0, (6, 4), torch.float32))
    assert module.weight is param and torch.equal(module.weight, values)
    assert spill._bytes.data_ptr() == module.weight.data_ptr()
