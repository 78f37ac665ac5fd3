"""`kiln cache ls` / `kiln cache clean` on a throw-away $KILN_HOME: sizes shown, the build this
checkout uses on this CPU kept, older and foreign builds removed, models only when named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.entrypoints.cli import main
from kiln.kernels import native


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "tiny.gguf").write_bytes(b"g" * 2048)
    old = tmp_path / "build" / "torch2.13.0_cpu-py311"  # an older kiln's folder
    old.mkdir(parents=True)
    (old / "kiln_native.so").write_bytes(b"o" * 4096)
    foreign = tmp_path / "build" / "kiln_native-00000000deadbeef"  # built on a CPU with other features
    foreign.mkdir()
    (foreign / "kiln_native.so").write_bytes(b"f" * 1024)
    (foreign / "build_info.json").write_text(json.dumps(
        {"key": {"target_features": ["AVX2", "FMA"], "torch_version": "2.13.0"}, "library": "kiln_native.so",
         "last_used": 0}))
    return tmp_path


def _fake_current(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    current = home / "build" / "kiln_native-1111111111111111"
    current.mkdir()
    (current / "kiln_native.so").write_bytes(b"c" * 512)
    (current / "build_info.json").write_text(json.dumps(
        {"key": {"target_features": ["AVX512F"], "torch_version": "2.13.0"}, "library": "kiln_native.so"}))
    monkeypatch.setattr(native, "current_build_folder", lambda: current)
    return current


def test_ls_shows_models_and_builds_with_sizes(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _fake_current(home, monkeypatch)
    main(["cache", "ls"])
    out = capsys.readouterr().out
    assert "tiny" in out and "2.0 KiB" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  kiln_native-") or "torch2" in line}
    assert "in use" in lines["kiln_native-1111111111111111"]
    assert "other" in lines["kiln_native-00000000deadbeef"] and "AVX2" in lines["kiln_native-00000000deadbeef"]
    assert "stale" in lines["torch2.13.0_cpu-py311"] and "4.0 KiB" in lines["torch2.13.0_cpu-py311"]


def test_clean_keeps_the_build_in_use_and_models(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    current = _fake_current(home, monkeypatch)
    main(["cache", "clean", "--dry-run"])
    out = capsys.readouterr().out
    assert "would remove build kiln_native-00000000deadbeef" in out and "would remove build torch2.13.0_cpu-py311" in out
    assert "kiln_native-1111111111111111" not in out
    assert len(list((home / "build").iterdir())) == 3  # dry run: nothing removed
    main(["cache", "clean"])
    assert [p.name for p in (home / "build").iterdir()] == [current.name]
    assert (home / "models" / "tiny").is_dir()
    main(["cache", "clean", "--all", "--model", "tiny"])
    assert list((home / "build").iterdir()) == [] and not (home / "models" / "tiny").exists()


def test_clean_of_an_unknown_model_says_what_exists(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "clean", "--model", "nope"]) == 2
    assert "no pulled model named nope" in capsys.readouterr().err
    assert (home / "models" / "tiny").is_dir() and len(list((home / "build").iterdir())) == 2  # nothing removed
