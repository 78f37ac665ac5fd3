"""Resident weights moved into one huge-page-advised mapping (kiln.offload.huge_pages) keep every value, every
alias and every Parameter object, and the engine's outputs do not change. The reference is the same model
loaded without the move (`huge_pages=False`), compared exactly: only where the bytes live changes."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.entrypoints.llm import LLM
from kiln.loader.model_loader import load_model
from kiln.offload.huge_pages import HUGE_PAGE, move_weights_to_huge_pages, thp_mode, weight_slots
from kiln.sampling_params import SamplingParams

PROMPTS = ["the cat sat on the mat", "hello world " * 6]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loader.tiny_model import TinySpec, make_checkpoint, write_gguf

    root = tmp_path_factory.mktemp("huge-pages")
    return write_gguf(make_checkpoint(TinySpec(tied=True, layers=2), seed=5), root / "tied.gguf")


class _Holder(nn.Module):
    """Parameters, buffers, plain tensor attributes, a tensor reachable twice, and views of one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(37, 5), requires_grad=False)
        self.register_buffer("codes", torch.randint(0, 255, (333,), dtype=torch.uint8))
        self.register_buffer("scales", torch.randn(7, 3).half())
        base = torch.randn(10, 8)
        self.dense_copy = base  # a plain attribute
        self.half_view = base[2:7, 1:5]  # a strided view of the same storage, from an offset
        self.child = nn.Linear(5, 3)
        self.child.shared = self.weight  # the same Parameter reachable from another module


def test_values_aliases_and_parameters_survive_the_move() -> None:
    m = _Holder()
    before = {name: t.clone() for name, t in [("weight", m.weight), ("codes", m.codes), ("scales", m.scales),
                                              ("dense", m.dense_copy), ("view", m.half_view),
                                              ("lin", m.child.weight)]}
    weight_object = m.weight
    alignment = {name: t.data_ptr() % 64 for name, t in [("codes", m.codes), ("view", m.half_view)]}
    unique_bytes = sum(t.numel() * t.element_size()
                       for t in (m.weight, m.codes, m.scales, m.dense_copy, m.child.weight, m.child.bias))
    old_codes = weakref.ref(m.codes)
    report = move_weights_to_huge_pages(m)
    assert m.weight is weight_object and isinstance(m.weight, nn.Parameter)
    assert m.child.shared is m.weight
    for name, t in [("weight", m.weight), ("codes", m.codes), ("scales", m.scales), ("dense", m.dense_copy),
                    ("view", m.half_view), ("lin", m.child.weight)]:
        assert torch.equal(t, before[name]) and t.dtype == before[name].dtype, name
    # the view still aliases its base: a write through one shows in the other
    m.dense_copy[3, 2] = 123.0
    assert m.half_view[1, 1].item() == 123.0
    assert m.half_view.stride() == (8, 1)
    # everything now lives in one mapping: addresses within one span no larger than the report says, each
    # storage copied once (the view shares its base's bytes) with at most 63 bytes of padding before it
    addresses = [t.data_ptr() for _, _, _, t in weight_slots(m)]
    assert max(addresses) - min(addresses) < report.moved_bytes
    assert unique_bytes <= report.moved_bytes < unique_bytes + 6 * 64
    assert {"codes": m.codes.data_ptr() % 64, "view": m.half_view.data_ptr() % 64} == alignment
    assert old_codes() is None  # the old buffer is not kept alive by the move
    if thp_mode() in ("always", "madvise"):
        assert report.huge_bytes % HUGE_PAGE == 0  # whole 2 MiB pages, when the kernel gave any


def test_an_empty_module_moves_nothing() -> None:
    assert move_weights_to_huge_pages(nn.Module()).moved_bytes == 0


def test_model_outputs_are_unchanged(tiny_gguf: Path) -> None:
    plain = load_model(tiny_gguf, "float32", quantized_weights="auto")
    moved = load_model(tiny_gguf, "float32", quantized_weights="auto", huge_pages=True)
    assert plain.huge_pages is None and moved.huge_pages is not None and moved.huge_pages.moved_bytes > 0
    for a, b in zip(plain.model.state_dict().values(), moved.model.state_dict().values()):
        assert torch.equal(a, b)


def test_engine_moves_weights_by_default_and_the_flag_turns_it_off(tiny_gguf: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    on = LLM(str(tiny_gguf), dtype="float32", kv_cache_memory="16MiB")
    off = LLM(str(tiny_gguf), dtype="float32", kv_cache_memory="16MiB", huge_page_weights=False)
    assert on.engine.loaded.huge_pages is not None and off.engine.loaded.huge_pages is None
    for a, b in zip(on.generate(PROMPTS, params), off.generate(PROMPTS, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_weights_under_a_budget_are_not_moved(tiny_gguf: Path) -> None:
    """--max-weight-memory keeps its own file-backed mapping for streamed layers; huge pages stay off there."""
    from kiln.offload.weight_offload import WeightOffloadConfig

    loaded = load_model(tiny_gguf, "float32", weight_offload=WeightOffloadConfig(1 << 30, Path("/tmp")),
                        huge_pages=True)
    assert loaded.huge_pages is None


def test_kiln_info_reports_the_huge_page_mapping(tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.entrypoints.cli import main as cli_main

    assert cli_main(["info", str(tiny_gguf), "--dtype", "float32"]) in (0, None)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("weight memory"))
    assert "MiB in one mapping advised for transparent huge pages" in line and f"THP mode: {thp_mode()}" in line
