"""The streamed load (a model built on the meta device and loaded layer by layer into the spill file; GGUF files
and safetensors folders) builds the very model the eager path builds (load fully, then move layers): the same
tensors, bit for bit, the same split and the same report. The eager path is the reference; tests/offload/test_weight_offload.py checks the
streamed model's outputs against the fully resident model's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.loader.model_loader import load_model
from kiln.offload.weight_offload import WeightOffloadConfig, linear_tensors, model_weight_tensors, unique_bytes

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from loader.tiny_model import TinySpec, make_checkpoint, write_gguf

    root = tmp_path_factory.mktemp("streamed-models")
    return {"tied": write_gguf(make_checkpoint(TinySpec(tied=True, layers=LAYERS), seed=5), root / "tied.gguf"),
            "untied": write_gguf(make_checkpoint(TinySpec(tied=False, layers=LAYERS), seed=6), root / "untied.gguf")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Hugging Face folders: one file, and two shards that deal each layer's tensors across both files."""
    from loader.tiny_model import TinySpec, make_checkpoint, write_hf_folder

    root = tmp_path_factory.mktemp("streamed-folders")
    return {"tied": write_hf_folder(make_checkpoint(TinySpec(tied=True, layers=LAYERS), seed=7), root / "tied"),
            "untied, 2 shards": write_hf_folder(make_checkpoint(TinySpec(tied=False, layers=LAYERS), seed=8),
                                                root / "untied", shards=2)}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = "the of and a to in is was that for on with as by at from his her it an be this".split()
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(words[(i * 7) % len(words)] for i in range(3000)))
    return path


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, plus the tensors outside the module tree (dense copies)."""
    state = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for name, module in model.named_modules():
        dense = getattr(module, "dense_weight", None)
        if isinstance(dense, torch.Tensor):
            state[f"{name}.dense_weight"] = dense
    return state


def _load(path: Path, budget: int, directory: Path, streamed: bool):
    config = WeightOffloadConfig(budget, directory, streamed_load=streamed)
    return load_model(path, "float32", quantized_weights="native", weight_offload=config)


def _one_layer_budget(path: Path, directory: Path) -> int:
    loaded = _load(path, 1 << 40, directory, streamed=False)  # the budget never binds: everything resident
    layers = [unique_bytes([t for _, _, t in linear_tensors(layer)]) for layer in loaded.model.layers]
    return unique_bytes(model_weight_tensors(loaded.model)) - sum(layers[1:]) + 1


@pytest.mark.parametrize("variant", ["tied", "untied"])
@pytest.mark.parametrize("resident", ["one layer", "all"])
def test_streamed_load_builds_the_eager_model(models, variant, resident, tmp_path) -> None:
    check_streamed_equals_eager(models[variant], resident, tmp_path)


@pytest.mark.parametrize("variant", ["tied", "untied, 2 shards"])
@pytest.mark.parametrize("resident", ["one layer", "all"])
def test_streamed_safetensors_load_builds_the_eager_model(folders, variant, resident, tmp_path) -> None:
    check_streamed_equals_eager(folders[variant], resident, tmp_path)


@pytest.mark.parametrize("variant", ["tied", "untied, 2 shards"])
def test_mapped_reader_reads_what_safetensors_reads(folders, variant) -> None:
    """Every tensor of every file: same names, dtype, shape and bytes as the safetensors library; a released
    tensor reads back the same (its pages return from the file)."""
    from safetensors import safe_open

    from kiln.loader.safetensors_loader import safetensors_files
    from kiln.loader.safetensors_mapped import MappedSafetensors

    for file in safetensors_files(folders[variant]):
        mapped = MappedSafetensors(file)
        with safe_open(str(file), framework="pt") as ref:
            assert sorted(mapped.keys()) == sorted(ref.keys())
            for name in ref.keys():
                want, got = ref.get_tensor(name), mapped.tensor(name)
                assert (got.dtype, got.shape) == (want.dtype, want.shape) and torch.equal(got, want), name
                mapped.release(name)
                assert torch.equal(mapped.tensor(name), want), name


def test_a_truncated_safetensors_file_is_one_clear_error(folders, tmp_path) -> None:
    from kiln.errors import ModelLoadError
    from kiln.loader.safetensors_mapped import MappedSafetensors

    data = (folders["tied"] / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="outside the file"):
        MappedSafetensors(bad)
    bad.write_bytes(b"\xff" * 8 + data[8:64])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        MappedSafetensors(bad)

    def with_header(header: dict, payload: bytes) -> Path:
        raw = json.dumps(header).encode()
        bad.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
        return bad

    with pytest.raises(ModelLoadError, match="bytes do not hold shape"):  # 8 bytes for a [3] float32
        MappedSafetensors(with_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)))
    with pytest.raises(ModelLoadError, match="bytes do not hold shape"):  # no bytes for a non-empty shape
        MappedSafetensors(with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 0]}}, bytes(8)))
    with pytest.raises(ModelLoadError, match="bad header entry"):
        MappedSafetensors(with_header({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)))
    with pytest.raises(ModelLoadError, match="not a JSON object"):
        MappedSafetensors(with_header([1, 2], bytes(8)))  # type: ignore[arg-type]
    empty = MappedSafetensors(with_header({"w": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}}, b""))
    assert empty.tensor("w").shape == (0, 4)


@pytest.mark.parametrize("spec", [dict(bits=4, group_size=32), dict(bits=8)], ids=["int4-g32", "int8"])
def test_streamed_load_of_a_kiln_quantized_folder(folders, calib_file, spec, tmp_path) -> None:
    """`kiln quantize` output streams like a full-precision folder: its methods are planned on the meta model,
    with the native block buffers their finalize adds (the split counts them)."""
    from kiln.quantization.checkpoint import save_quantized
    from kiln.quantization.quantize import QuantizeOptions, quantize_model

    loaded = load_model(folders["untied, 2 shards"], dtype="float32")
    report = quantize_model(loaded.model, loaded.tokenizer, QuantizeOptions(
        calib_file=calib_file, calib_samples=2, calib_seqlen=64, progress=False, method="rtn", **spec))
    out = save_quantized(tmp_path / "q", loaded.model, loaded.config, loaded.tokenizer, report.quantization_config)
    check_streamed_equals_eager(out, "one layer", tmp_path)


@pytest.mark.parametrize("fmt, bits, group, sym, kw", [("gptq", 4, 32, False, {"v1": False}),
                                                      ("gptq", 4, 32, True, {"v1": True, "desc_act": True}),
                                                      ("awq", 4, 32, False, {}),
                                                      ("compressed-tensors", 8, -1, True, {})],
                         ids=["gptq4", "gptq4-act-order", "awq4", "compressed-tensors8"])
def test_streamed_load_of_foreign_folders(calib_file, fmt, bits, group, sym, kw, tmp_path) -> None:
    """GPTQ / AWQ / compressed-tensors folders: translated to kiln's INT layout group by group, the same model."""
    from kiln.quantization.foreign.layout import IntLayout
    from loader.tiny_model import build_tiny_models
    from quantization.test_foreign_formats import foreign_folder, kiln_folder

    tiny = build_tiny_models(tmp_path / "tiny")
    kiln_dir = kiln_folder(tiny, calib_file, tmp_path / "kiln", bits, group, sym)
    check_streamed_equals_eager(foreign_folder(kiln_dir, tmp_path / fmt, fmt, IntLayout(bits, group, sym), **kw),
                                "one layer", tmp_path)


def check_streamed_equals_eager(path: Path, resident: str, directory: Path) -> None:
    """Same report, same tensors bit for bit, same embedding lookups, eager vs streamed."""
    budget = _one_layer_budget(path, directory) if resident == "one layer" else 1 << 40
    eager, streamed = _load(path, budget, directory, False), _load(path, budget, directory, True)
    a, b = eager.offload, streamed.offload
    assert (b.resident_bytes, b.fixed_bytes, b.mapped_bytes, b.resident_layers, b.spilled_layers,
            b.embedding_from_blocks) == (a.resident_bytes, a.fixed_bytes, a.mapped_bytes, a.resident_layers,
                                         a.spilled_layers, a.embedding_from_blocks)
    if resident == "one layer":
        assert b.spilled_layers == list(range(1, len(eager.model.layers)))
    sa, sb = _state(eager.model), _state(streamed.model)
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert not sb[name].is_meta, name
        assert (sb[name].dtype, sb[name].shape) == (sa[name].dtype, sa[name].shape), name
        assert torch.equal(sb[name], sa[name]), name
    assert type(streamed.model.embed_tokens) is type(eager.model.embed_tokens)
    assert (getattr(streamed.model, "quantized_tied_head", None) is None) == \
        (getattr(eager.model, "quantized_tied_head", None) is None)
    ids = torch.tensor([1, 5, 7, 30])
    assert torch.equal(streamed.model.embed_tokens(ids), eager.model.embed_tokens(ids))


def test_a_budget_below_the_fixed_part_fails_before_any_layer_is_read(models, tmp_path) -> None:
    from kiln.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="must stay resident"):
        _load(models["tied"], 1024, tmp_path, streamed=True)
    assert list(tmp_path.iterdir()) == []  # no spill file was made


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_lean_reader_reads_what_the_gguf_library_reads(models, variant) -> None:
    check_lean_reader(models[variant])


def check_lean_reader(path: Path) -> None:
    """Every metadata value (same Python type) and every tensor (name, type, shape, offset, bytes) equal."""
    from gguf import GGUFReader

    from kiln.loader.gguf_lean import LeanGGUFReader

    ref, lean = GGUFReader(path, "r"), LeanGGUFReader(path)
    assert list(lean.fields) == list(ref.fields)
    for key, field in ref.fields.items():
        want, got = field.contents(), lean.fields[key].contents()
        assert got == want and type(got) is type(want), key
    assert len(lean.tensors) == len(ref.tensors)
    for r, t in zip(ref.tensors, lean.tensors):
        assert (t.name, t.tensor_type, t.n_elements, t.n_bytes, t.data_offset) == \
               (r.name, r.tensor_type, r.n_elements, r.n_bytes, r.data_offset)
        assert np.array_equal(t.shape, r.shape) and t.data.dtype == r.data.dtype and t.data.shape == r.data.shape
        assert np.array_equal(t.data, r.data), t.name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_packing_in_row_chunks_equals_the_gguf_library_values(qtype, monkeypatch) -> None:
    """Blocks are packed PACK_ROWS rows at a time (bounding the load's transient copies); with a chunk of 5
    rows over 23 (a ragged last chunk) the layer holds exactly what one whole-tensor pack holds, and its
    weight dequantizes to the gguf library's values. Each consumed slice is reported once, in order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    import kiln.layers.gguf_quant as gq
    from kiln.layers.gguf_quant import GGUFQuantizedTensor, block_method, family_of
    from kiln.layers.linear import Linear

    rows, cols = 23, 96
    raw = quantize(np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32), GGMLQuantizationType[qtype])

    def packed(chunk: int) -> tuple[Linear, list[tuple[int, int]]]:
        monkeypatch.setattr(gq, "PACK_ROWS", chunk)
        seen: list[tuple[int, int]] = []
        blocks = GGUFQuantizedTensor(qtype, torch.from_numpy(np.ascontiguousarray(raw)), cols)
        base = blocks.raw.data_ptr()
        row_bytes = blocks.raw.shape[1]
        blocks.consumed = lambda view: seen.append(((view.data_ptr() - base) // row_bytes, view.shape[0]))
        layer = Linear(cols, [rows], dtype=torch.float32, device=torch.device("cpu"))
        layer.set_method(block_method(family_of({qtype}), keep_dense=False))
        layer.weight_loader("weight", blocks)
        return layer, seen

    whole, _ = packed(1 << 30)
    chunked, seen = packed(5)
    assert seen == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 3)]
    for name in ("qs", "d", "m"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    table = GGUFQuantizedTensor(qtype, torch.from_numpy(np.ascontiguousarray(raw)), cols).dequantize()
    assert torch.equal(chunked.method.dequantize_weight(chunked, torch.float32), table)
