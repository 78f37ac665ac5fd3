"""The native build cache: one folder per binary (sources, flags, compiler, torch, target CPU
features), shared by two checkouts of the same sources, never loaded on a CPU that lacks its
features, and never blocked by a lock whose builder died.

Builds here compile one tiny C++ file into a temporary folder (about a second each)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.kernels import build_cache, native
from kiln.kernels.build_lock import LOCK_NAME, TORCH_LOCK_NAME, BuildLock

needs_compiler = pytest.mark.skipif(native.cxx_compiler() is None, reason="needs a C++ compiler")

SOURCE = 'extern "C" int kiln_cache_probe() { return 7; }\n'
NAME = "kiln_test_cache_probe"


def _tree(root: Path, text: str = SOURCE) -> Path:
    """A source tree (one .cpp and a header) in its own folder, as a checkout would have it."""
    root.mkdir(parents=True)
    (root / "probe.h").write_text("#pragma once\n")
    source = root / "probe.cpp"
    source.write_text(text)
    return source


@needs_compiler
def test_two_checkouts_of_the_same_sources_share_one_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = _tree(tmp_path / "clone_a" / "csrc"), _tree(tmp_path / "clone_b" / "csrc")
    root = tmp_path / "build"
    assert native.build_folder([first], root, ["-O0"], NAME) == native.build_folder([second], root, ["-O0"], NAME)
    assert native.build_and_load([first], root, ["-O0"], NAME) is not None  # built once
    capsys.readouterr()
    assert native.build_and_load([second], root, ["-O0"], NAME) is None  # the other clone loads it
    assert native.BUILDING_LINE not in capsys.readouterr().err
    assert len(build_cache.list_builds(root)) == 1


@needs_compiler
def test_changed_sources_flags_or_target_get_their_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _tree(tmp_path / "a")
    edited = _tree(tmp_path / "b", SOURCE + "// another commit\n")
    header_edited = _tree(tmp_path / "c")
    (header_edited.parent / "probe.h").write_text("#pragma once\n#define KILN_X 1\n")
    root = tmp_path / "build"
    folders = {native.build_folder([source], root, ["-O0"], NAME), native.build_folder([edited], root, ["-O0"], NAME),
               native.build_folder([header_edited], root, ["-O0"], NAME),
               native.build_folder([source], root, ["-O0", "-march=native"], NAME)}
    assert len(folders) == 4


@needs_compiler
def test_a_build_for_other_cpu_features_is_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, root = _tree(tmp_path / "src"), tmp_path / "build"
    flags = ["-O0", "-march=native"]
    here = native.build_folder([source], root, flags, NAME)
    assert native.build_and_load([source], root, flags, NAME) is not None
    assert not native.needs_build(here, NAME)

    # The same home directory on a CPU with other features: its -march=native resolves differently,
    # so it computes another folder and builds there instead of loading this one.
    real = build_cache.target_features
    other_cpu = ("AVX2", "FMA")
    monkeypatch.setattr(build_cache, "target_features",
                        lambda compiler, march: other_cpu if march else real(compiler, march))
    elsewhere = native.build_folder([source], root, flags, NAME)
    assert elsewhere != here and native.needs_build(elsewhere, NAME)

    # A folder copied by hand under this CPU's key but built for features it lacks is refused, not loaded.
    monkeypatch.setattr(build_cache, "target_features", real)
    info = build_cache.read_build_info(here)
    assert info is not None
    info["key"]["target_features"] = [*info["key"]["target_features"], "AVX_FROM_THE_FUTURE"]  # type: ignore[index]
    (here / build_cache.BUILD_INFO).write_text(__import__("json").dumps(info))
    with pytest.raises(KilnError, match="AVX_FROM_THE_FUTURE"):
        native.build_and_load([source], root, flags, NAME)


def test_target_features_name_instruction_sets_not_cpu_models() -> None:
    compiler = native.cxx_compiler()
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    haswell = build_cache.target_features(compiler, ("-march=haswell",))
    assert {"AVX2", "FMA", "AVX"} <= set(haswell) and not any(f.startswith("AVX512") for f in haswell)
    assert all(f == f.upper() for f in haswell)  # no __haswell__ / __tune_*__ model macros
    assert build_cache.target_features(compiler, ()) == ()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@needs_compiler
def test_a_lock_left_by_a_dead_builder_is_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, root = _tree(tmp_path / "src"), tmp_path / "build"
    folder = native.build_folder([source], root, ["-O0"], NAME)
    folder.mkdir(parents=True)
    dead = _dead_pid()
    (folder / LOCK_NAME).write_text(f'{{"pid": {dead}, "host": "here", "started": 0}}')
    (folder / TORCH_LOCK_NAME).write_text("")  # what torch leaves when its builder is killed

    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(native.build_and_load([source], root, ["-O0"], NAME)),
                              daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "build_and_load waited on a dead builder's lock"
    assert isinstance(result[0], float)  # it built
    err = capsys.readouterr().err
    assert "stale build lock" in err and f"pid {dead}" in err
    assert not (folder / TORCH_LOCK_NAME).exists()


def test_a_live_holder_is_waited_for_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with BuildLock(tmp_path):
        # flock locks belong to open files, so a second BuildLock in this process contends like another process
        with pytest.raises(KilnError, match=r"pid \d+"):
            with BuildLock(tmp_path, timeout_s=0.3, poll_s=0.05):
                pass
    assert "waiting for the native kernel build" in capsys.readouterr().err
    with BuildLock(tmp_path, timeout_s=0.3):  # released: taken at once
        pass


def test_list_and_remove_builds(tmp_path: Path) -> None:
    (tmp_path / "kiln_native-aaaa").mkdir()
    (tmp_path / "kiln_native-aaaa" / "x.so").write_bytes(b"0" * 1000)
    (tmp_path / "torch2.13.0_cpu-py311").mkdir()  # an older kiln's folder: no build_info.json
    builds = build_cache.list_builds(tmp_path)
    assert [b.path.name for b in builds] == ["kiln_native-aaaa", "torch2.13.0_cpu-py311"]
    assert builds[0].size_bytes == 1000 and builds[1].info is None
    assert build_cache.remove_builds(builds[:1]) == 1000
    assert [b.path.name for b in build_cache.list_builds(tmp_path)] == ["torch2.13.0_cpu-py311"]
    shutil.rmtree(tmp_path / "torch2.13.0_cpu-py311")


def test_a_compiler_that_cannot_preprocess_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "c++"
    broken.write_text("#!/bin/sh\necho 'c++: internal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    build_cache.target_features.cache_clear()
    build_cache.compiler_identity.cache_clear()
    with pytest.raises(KilnError, match="KILN_NO_NATIVE=1"):
        native.build_folder([_tree(tmp_path / "src")], tmp_path / "build", ["-O0", "-march=native"], NAME)
