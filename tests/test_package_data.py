"""kiln.data: the shipped files are the ones DATA.md names (sha256), a wheel would install them,
and $KILN_DATA overrides file by file without ever being required."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from pathlib import Path

import pytest

from kiln import data
from kiln.errors import KilnError

REPO = Path(__file__).resolve().parents[1]


def _documented_sha256() -> dict[str, str]:
    """file → sha256 from the table in DATA.md (rows start with | `file` |, the hash is in backticks)."""
    table = {}
    for line in (data.PACKAGE_DIR / "DATA.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([^`]+)` \|.*`([0-9a-f]{64})`", line)
        if m:
            table[m.group(1)] = m.group(2)
    return table


def test_every_shipped_file_matches_its_documented_sha256() -> None:
    documented = _documented_sha256()
    assert set(documented) == set(data.SHIPPED)
    for name in data.SHIPPED:
        digest = hashlib.sha256(data.data_path(name).read_bytes()).hexdigest()
        assert digest == documented[name], f"{name} differs from the copy DATA.md describes"


def test_package_data_globs_cover_every_shipped_file() -> None:
    """What setuptools puts in a wheel: pyproject's patterns for kiln.data must match each file."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["kiln.data"]
    for name in (*data.SHIPPED, "DATA.md"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} would be left out of a wheel"


def test_defaults_do_not_look_beside_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_DATA", raising=False)
    for name in data.SHIPPED:
        assert data.data_path(name).is_relative_to(data.PACKAGE_DIR)


def test_kiln_data_overrides_file_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / data.GSM8K_TEST).write_text('{"question": "q", "answer": "a"}\n')
    monkeypatch.setenv("KILN_DATA", str(tmp_path))
    assert data.data_path(data.GSM8K_TEST) == tmp_path / data.GSM8K_TEST
    assert data.data_path(data.WIKITEXT2_TEST) == data.PACKAGE_DIR / data.WIKITEXT2_TEST  # absent there: shipped


def test_kiln_data_that_is_no_folder_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_DATA", str(tmp_path / "missing"))
    with pytest.raises(KilnError, match="KILN_DATA=.*is not a folder; unset it"):
        data.data_path(data.WIKITEXT2_TEST)


def test_unknown_name_names_what_is_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_DATA", raising=False)
    with pytest.raises(KilnError, match="not shipped with kiln.*wiki.test.raw"):
        data.data_path("prompts/nope.jsonl")


def test_bench_prompts_come_from_the_shipped_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.bench.data import gsm8k_questions, long_text
    from kiln.bench.load_generator import load_prompts

    monkeypatch.delenv("KILN_DATA", raising=False)
    assert len(gsm8k_questions(3)) == 3 and long_text(40).startswith("First Citizen:")
    assert len(load_prompts("mtbench", 2)) == 2
