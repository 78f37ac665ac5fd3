"""`kiln serve --config FILE`: engine options from a JSON file (what `kiln advise --apply` writes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.engine.arg_utils import EngineArgs


def _parse(argv: list[str]):
    from kiln.entrypoints.cli import build_parser

    return build_parser().parse_args(argv)


def test_file_options_apply_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"model": "my.gguf", "kv_cache_dtype": "int8", "max_num_seqs": 4,
                                "max_num_batched_tokens": 2048}))
    args = _parse(["serve", "--config", str(path), "--max-num-seqs", "8"])
    ea = EngineArgs.from_config_file(args.config, args)
    assert (ea.model, ea.kv_cache_dtype, ea.max_num_batched_tokens) == ("my.gguf", "int8", 2048)
    assert ea.max_num_seqs == 8  # the flag wins over the file
    assert ea.block_size == EngineArgs().block_size  # neither set it: the default


def test_bad_files_are_one_clear_error(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"max_num_seqz": 4}))
    with pytest.raises(ValueError, match="unknown engine option.*max_num_seqz"):
        EngineArgs.from_config_file(str(bad_key))
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        EngineArgs.from_config_file(str(not_object))
    with pytest.raises(ValueError, match="--config"):
        EngineArgs.from_config_file(str(tmp_path / "missing.json"))


def test_serve_builds_its_engine_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.engine.async_engine import AsyncEngine
    from kiln.entrypoints import cli

    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"model": "x.gguf", "speculative_model": "ngram"}))
    seen = {}

    class Stop(Exception):
        pass

    def capture(engine_args, **_):
        seen["args"] = engine_args
        raise Stop

    monkeypatch.setattr(AsyncEngine, "from_engine_args", staticmethod(capture))
    with pytest.raises(Stop):
        cli.cmd_serve(_parse(["serve", "--config", str(path)]))
    assert seen["args"].model == "x.gguf" and seen["args"].speculative_model == "ngram"
