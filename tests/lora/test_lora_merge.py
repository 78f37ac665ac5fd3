"""`kiln lora merge` on the tiny model (fast): the merged folder loads in kiln and in transformers, and
its logits equal peft's own merge (`merge_and_unload`) of the same adapter; re-quantized, it reports a KL
against base+adapter that is small but above the float merge's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="LoRA reference tests need the test extras (peft)")

from kiln.entrypoints.cli import main as kiln_main
from kiln.entrypoints.cli_lora import merge_adapter
from kiln.eval.forward import window_logits
from kiln.loader.model_loader import load_model
from kiln.quantization.quantize import QuantizeOptions
from lora.conftest import Adapters
from lora.peft_adapters import TEXT, load_hf, peft_model, reference_logits


def test_merged_folder_equals_peft_merge(adapters: Adapters, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    report = merge_adapter(str(adapters.base), str(adapters.a), out, kl_windows=2, ctx=64, progress=False)
    window = adapters.ids[:32]
    ref = reference_logits(peft_model(adapters.base, adapters.a).merge_and_unload(), window)
    ours = window_logits(load_model(out, dtype="float32").model, window)
    # the folder holds float16 weights: as close as rounding the merged weights allows
    torch.testing.assert_close(ours, ref, atol=0.05, rtol=0.01)
    hf = reference_logits(load_hf(out), window)  # transformers loads it too, to the same logits
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)
    assert report.n_tokens > 0 and 0 <= report.kl_mean < 1e-3 and report.top1_agreement > 0.97


def test_merge_then_quantize_reports_its_kl(adapters: Adapters, tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 20)
    opts = QuantizeOptions(method="rtn", bits=4, group_size=32, calib_file=calib, calib_samples=2, calib_seqlen=64,
                           progress=False)
    report = merge_adapter(str(adapters.base), str(adapters.a), tmp_path / "q", opts, kl_windows=2, ctx=64,
                           progress=False)
    assert report.quantized == "rtn int4 g32"
    assert 1e-4 < report.kl_mean < 5.0  # 4-bit rounding costs something, and the result is still the model
    assert "quantization_config" in (tmp_path / "q" / "config.json").read_text()


def test_cli_refuses_a_non_empty_output(adapters: Adapters, tmp_path: Path, capsys) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    code = kiln_main(["lora", "merge", str(adapters.base), str(adapters.a), "-o", str(tmp_path / "taken")])
    assert code == 2 and "not an empty folder" in capsys.readouterr().err
