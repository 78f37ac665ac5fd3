"""Broken model files and folders: each gives a ModelLoadError naming the file and the problem, and
`kiln info` prints it as one `kiln: error:` line (exit code 2), never a traceback.

The CLI is run in-process (`kiln.entrypoints.cli.main`, stderr captured at the file-descriptor level)
for every case, and as a real `python -m kiln.entrypoints.cli` subprocess for a few of them: each
subprocess pays ~2 s of torch import, too much to spend on every case.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from kiln.entrypoints.cli import main as cli_main
from kiln.errors import ModelLoadError, ModelNotFoundError
from kiln.hub import resolve_model
from kiln.loader.model_loader import load_model

from .tiny_model import TinyModels, build_tiny_models, one_torch_thread, write_gguf, write_hf_folder

REPO = Path(__file__).resolve().parents[2]
UNKNOWN_NAME = "no-such-model-kiln-test"


@dataclass
class Case:
    path: Path  # what is passed to load_model / `kiln info`
    named: Path  # the file or folder the message must name
    fragments: tuple[str | tuple[str, ...], ...]  # each must be in the message (a tuple: any one of them)


class _TouchOnUnpickle:
    """Unpickling this creates `marker`: proof that a loader ran pickle on the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _truncate(path: Path, keep: int | float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])


def _build_cases(tiny: TinyModels, root: Path) -> dict[str, Case]:
    ck = tiny.tied
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}

    def gguf_case(name: str, fragments, make: Callable[[Path], None]) -> None:
        path = root / f"{name}.gguf"
        make(path)
        cases[name] = Case(path, path, fragments)

    def copy_truncated(keep):
        def make(p: Path) -> None:
            p.write_bytes(tiny.gguf["tied"].read_bytes())
            _truncate(p, keep)
        return make

    gguf_case("gguf_truncated_half", (("truncated", "corrupt"),), copy_truncated(0.5))
    gguf_case("gguf_truncated_in_metadata", (("truncated", "corrupt"),), copy_truncated(300))
    gguf_case("gguf_not_a_gguf", ("not a GGUF file",), lambda p: p.write_text("just some text, not a model\n"))
    gguf_case("gguf_empty_file", ("not a GGUF file",), lambda p: p.write_bytes(b""))
    for arch in ("phi3", "gpt2"):
        gguf_case(f"gguf_arch_{arch}", (f"unsupported architecture '{arch}'", "llama", "mistral", "qwen2"),
                  lambda p, arch=arch: write_gguf(ck, p, arch=arch))
    gguf_case("gguf_missing_tensor", ("missing tensor", ("blk.1.ffn_down", "layers.1.mlp.down_proj")),
              lambda p: write_gguf(ck, p, drop=("blk.1.ffn_down.weight",)))
    gguf_case("gguf_shape_mismatch", ("shape mismatch", ("blk.0.ffn_up", "layers.0.mlp.up_proj"), "(100, 64)"),
              lambda p: write_gguf(ck, p, replace_tensors={"blk.0.ffn_up.weight": np.zeros((100, 64), np.float32)}))
    # attn_k with 30 rows: not a multiple of 2 * head_count_kv, so llama.cpp's row permutation cannot be undone.
    gguf_case("gguf_shape_mismatch_attn_k", ("shape", ("blk.0.attn_k", "layers.0.self_attn.k_proj"), "30"),
              lambda p: write_gguf(ck, p, replace_tensors={"blk.0.attn_k.weight": np.zeros((30, 64), np.float32)}))

    def hf_case(name: str, fragments, shards: int = 1, named: str | None = None,
                change: Callable[[Path], None] = lambda f: None) -> None:
        folder = write_hf_folder(ck, root / name, shards=shards)
        change(folder)
        cases[name] = Case(folder, folder / named if named else folder, fragments)

    hf_case("hf_no_config_json", ("no config.json",), change=lambda f: (f / "config.json").unlink())

    def bin_only(f: Path) -> None:
        (f / "model.safetensors").unlink()
        (f / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(f / "UNPICKLED"), protocol=4))

    hf_case("hf_pytorch_bin_only", ("safetensors",), change=bin_only)
    hf_case("hf_truncated_safetensors", (("truncated", "corrupt"),), named="model.safetensors",
            change=lambda f: _truncate(f / "model.safetensors", 0.5))
    hf_case("hf_truncated_shard", (("truncated", "corrupt"),), shards=2, named="model-00002-of-00002.safetensors",
            change=lambda f: _truncate(f / "model-00002-of-00002.safetensors", 0.5))
    hf_case("hf_corrupt_index_json", (("JSON", "json"),), shards=2, named="model.safetensors.index.json",
            change=lambda f: (f / "model.safetensors.index.json").write_text("{not json"))

    def rewrite(f: Path, edit: Callable[[dict], dict]) -> None:
        save_file({k: v.contiguous() for k, v in edit(dict(ck.hf)).items()}, str(f / "model.safetensors"))

    hf_case("hf_missing_tensor", ("missing tensor", "layers.1.mlp.down_proj"),
            change=lambda f: rewrite(f, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.down_proj" not in k}))
    hf_case("hf_shape_mismatch", ("shape mismatch", "layers.0.self_attn.k_proj", "(30, 64)"),
            change=lambda f: rewrite(f, lambda t: t | {"model.layers.0.self_attn.k_proj.weight":
                                                      t["model.layers.0.self_attn.k_proj.weight"][:30]}))
    return cases


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


@pytest.fixture(scope="module")
def cases(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return _build_cases(tiny, tmp_path_factory.mktemp("bad-files"))


CASE_NAMES = [
    "gguf_truncated_half", "gguf_truncated_in_metadata", "gguf_not_a_gguf", "gguf_empty_file", "gguf_arch_phi3",
    "gguf_arch_gpt2", "gguf_missing_tensor", "gguf_shape_mismatch", "gguf_shape_mismatch_attn_k",
    "hf_no_config_json", "hf_pytorch_bin_only", "hf_truncated_safetensors", "hf_truncated_shard",
    "hf_corrupt_index_json", "hf_missing_tensor", "hf_shape_mismatch",
]


def _check_message(message: str, case: Case) -> None:
    assert str(case.named) in message, f"message does not name {case.named}: {message!r}"
    for fragment in case.fragments:
        options = fragment if isinstance(fragment, tuple) else (fragment,)
        assert any(o in message for o in options), f"message lacks {' / '.join(options)!r}: {message!r}"


def _load_error(path: Path) -> ModelLoadError:
    try:
        load_model(path, dtype="float32")
    except ModelLoadError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - any other type is a kiln bug: the CLI shows a traceback
        other = exc
    else:
        pytest.fail(f"{path} loaded without error")
    pytest.fail(f"kiln bug: loading {path} raised {type(other).__name__}: {other} instead of ModelLoadError, "
                f"so `kiln info` prints a traceback")


def _run_cli_in_process(capfd: pytest.CaptureFixture[str], arg: str) -> tuple[int, str]:
    capfd.readouterr()
    try:
        rc = cli_main(["info", arg, "--dtype", "float32"])
    except BaseException as exc:  # noqa: BLE001 - escaping main() means a traceback from `python -m kiln...`
        escaped = f"{type(exc).__name__}: {exc}"
    else:
        return rc, capfd.readouterr().err
    pytest.fail(f"kiln bug: `kiln info {arg}` would print a traceback ({escaped})")


def _check_cli(rc: int, stderr: str, case: Case | None, arg: str) -> None:
    assert "Traceback" not in stderr, f"`kiln info {arg}` printed a traceback:\n{stderr}"
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), f"expected one `kiln: error:` line, got:\n{stderr}"
    assert rc == 2
    if case is not None:
        _check_message(lines[0], case)
    else:
        assert UNKNOWN_NAME in lines[0]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_load_model_raises_model_load_error(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    exc = _load_error(case.path)
    _check_message(str(exc), case)
    assert "\n" not in str(exc)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_info_prints_one_error_line(cases: dict[str, Case], capfd: pytest.CaptureFixture[str], name: str) -> None:
    rc, err = _run_cli_in_process(capfd, str(cases[name].path))
    _check_cli(rc, err, cases[name], str(cases[name].path))


def test_pickle_checkpoint_is_never_unpickled(cases: dict[str, Case]) -> None:
    folder = cases["hf_pytorch_bin_only"].path
    exc = _load_error(folder)
    assert ".bin" in str(exc) or "pickle" in str(exc)
    assert not (folder / "UNPICKLED").exists(), "kiln unpickled pytorch_model.bin"


def test_unknown_model_name() -> None:
    assert not Path(UNKNOWN_NAME).exists()
    with pytest.raises(ModelNotFoundError, match=UNKNOWN_NAME) as exc:
        resolve_model(UNKNOWN_NAME)
    assert "smollm2-135m" in str(exc.value)  # lists the known names


def test_unknown_model_name_cli_in_process(capfd: pytest.CaptureFixture[str]) -> None:
    rc, err = _run_cli_in_process(capfd, UNKNOWN_NAME)
    _check_cli(rc, err, None, UNKNOWN_NAME)


# The real entry point, as a user runs it; started together so the torch imports overlap.
SUBPROCESS_CASES = ["gguf_truncated_half", "hf_pytorch_bin_only", UNKNOWN_NAME]


@pytest.fixture(scope="module")
def cli_runs(cases: dict[str, Case]) -> dict[str, tuple[int, str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {}
    for name in SUBPROCESS_CASES:
        arg = str(cases[name].path) if name in cases else name
        procs[name] = subprocess.Popen([sys.executable, "-m", "kiln.entrypoints.cli", "info", arg],
                                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        results[name] = (proc.returncode, err)
    return results


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_cli_subprocess_prints_one_error_line(cases: dict[str, Case], cli_runs, name: str) -> None:
    rc, err = cli_runs[name]
    case = cases.get(name)
    _check_cli(rc, err, case, str(case.path) if case else name)
