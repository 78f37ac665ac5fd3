"""`kiln advise` end to end on the tiny random GGUF: the report's schema, verification and --apply.

Speed figures of a 2-layer random model mean nothing; what is checked is the plumbing: every
recommendation verified is re-measured and classified, quality is measured against the baseline, and the
file --apply writes is one `kiln serve --config` reads.
"""

from __future__ import annotations

import json

import pytest

from kiln.engine.arg_utils import EngineArgs

SCHEMA_KEYS = {"schema", "profile", "questions", "recommendations", "dropped", "unverified", "baseline", "winner"}
REC_KEYS = {"name", "settings", "reason", "predicted_gain", "measured_gain", "quality_kl", "quality_top1", "slo_pass",
            "cost_per_mtok", "verified"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def test_advise_report_verifies_and_applies(tiny, tmp_path, capsys, monkeypatch) -> None:
    from kiln.entrypoints.cli_plan import main
    from kiln.planner import calibration

    monkeypatch.setattr(calibration, "load_calibration", lambda *a, **k: None)  # this machine's cache plays no part

    out = tmp_path / "winner.json"
    argv = ["advise", str(tiny.gguf["tied"]), "--workload", "chat", "--concurrency", "1", "--num-requests", "2",
            "--max-tokens", "4", "--top", "2", "--dtype", "bfloat16", "--quantized-weights", "dequantize",
            "--slo-ttft-ms", "60000", "--cost-per-hour", "1.0", "--kv-cache-memory", "16MiB",
            "--apply", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert SCHEMA_KEYS <= set(report) and report["schema"] == "kiln.advise/1"
    assert [q["question"] for q in report["questions"]] == [
        "prefill-bound or decode-bound?", "is the KV cache the capacity limit?",
        "are the best kernels for this device in use?", "is batching stable under this traffic?"]
    verified = report["recommendations"] + report["dropped"]
    assert verified, "the bf16 dense baseline must trigger at least one kernel rule"
    for rec in verified:
        assert REC_KEYS <= set(rec) and rec["measured_gain"] is not None and rec["quality_kl"] >= 0.0
        assert (rec["measured_gain"] > 0) == (rec["verified"] == "better")
    assert all(r["verified"] == "better" for r in report["recommendations"])
    assert report["baseline"]["slo_pass"] is True and report["baseline"]["cost_per_mtok"] > 0
    applied = EngineArgs.from_config_file(str(out))
    assert applied.model == str(tiny.gguf["tied"]) and applied.kv_cache_memory == "16MiB"
    if report["winner"]:
        for key, value in report["winner"]["config"].items():
            assert getattr(applied, key) == value
