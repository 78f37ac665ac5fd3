"""EngineArgs is the one place an engine option is declared (kiln issue 16, item 1)."""

from __future__ import annotations

import argparse
import inspect

import pytest

from kiln.config import KernelConfig
from kiln.engine.arg_utils import EngineArgs
from kiln.entrypoints.cli import build_parser
from kiln.entrypoints.llm import LLM

# Options of `kiln serve` that are about the HTTP server, not the engine.
SERVE_ONLY = {"host", "port", "api_key", "max_queue", "served_model_name", "shutdown_timeout", "log_level",
              "max_n", "max_stop_strings", "max_request_tokens", "max_body_bytes", "max_streams_per_key",
              "config", "no_ui",  # --no-ui: no browser pages; --config: a file of engine options, read through EngineArgs.from_config_file
              # replicas on Ray Serve (kiln/entrypoints/replicas/options.py): how many engines and where, not how each runs
              "replicas", "min_replicas", "max_replicas", "ray_address", "replica_routing"}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in ("help",) and a.option_strings}


def test_serve_flags_are_engine_args_plus_server_flags() -> None:
    dests = _dests(_subparser("serve"))
    assert set(EngineArgs.option_names()) <= dests
    assert dests - set(EngineArgs.option_names()) == SERVE_ONLY


@pytest.mark.parametrize("command", ["generate", "chat", "bench"])
def test_every_engine_command_has_every_engine_flag(command: str) -> None:
    assert set(EngineArgs.option_names()) <= _dests(_subparser(command))


def test_llm_takes_only_engine_args() -> None:
    params = inspect.signature(LLM.__init__).parameters
    assert list(params) == ["self", "model", "engine_options"]
    assert params["engine_options"].kind is inspect.Parameter.VAR_KEYWORD
    with pytest.raises(TypeError, match="unknown engine option.*max_num_seqs"):
        LLM("smollm2-135m", max_num_sequences=4)


def test_cli_and_kwargs_build_the_same_config() -> None:
    ns = _subparser("serve").parse_args(["--max-num-seqs", "8", "--kv-cache-memory", "64MiB", "--no-prefix-caching",
                                         "--speculative-model", "ngram", "--no-fused-decode-step", "--threads", "1"])
    from_cli = EngineArgs.from_cli_args(ns).create_engine_config()
    from_kwargs = EngineArgs(max_num_seqs=8, kv_cache_memory="64MiB", enable_prefix_caching=False,
                             speculative_model="ngram", fused_decode_step=False, threads=1).create_engine_config()
    assert from_cli == from_kwargs
    assert from_cli.cache.kv_cache_memory == 64 << 20 and from_cli.scheduler.max_num_seqs == 8
    assert not from_cli.kernel.fused_decode_step and from_cli.parallel.threads == 1


def test_defaults_match_between_cli_and_dataclass() -> None:
    ns = _subparser("serve").parse_args([])
    assert EngineArgs.from_cli_args(ns) == EngineArgs()


def test_kernel_switches_default_to_the_environment_and_flags_win(monkeypatch) -> None:
    monkeypatch.setenv("KILN_FUSED", "0")
    monkeypatch.setenv("KILN_PREFILL_ATTENTION", "sdpa")
    assert EngineArgs().kernel_config() == KernelConfig(fused_ops=False, prefill_attention="sdpa")
    assert EngineArgs(fused_ops=True, prefill_attention="native").kernel_config() == KernelConfig()
    monkeypatch.setenv("KILN_PREFILL_ATTENTION", "flash")
    with pytest.raises(ValueError, match="prefill_attention must be one of native, sdpa"):
        EngineArgs().kernel_config()


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineArgs(kv_cache_dtype="int3").create_engine_config()
    with pytest.raises(ValueError, match="quantized_weights must be one of"):
        EngineArgs(quantized_weights="maybe").create_engine_config()
    with pytest.raises(ValueError, match="threads must be >= 1"):
        EngineArgs(threads=0).create_engine_config()
