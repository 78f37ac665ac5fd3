"""Building the native kernels: announced only when a build runs, a failed build is a KilnError with
the compiler's words, and plain torch is used only when switched off or when no compiler exists.

Builds here compile one tiny C++ file into a temporary folder (about a second); the real library
in the kiln cache is never rebuilt. Every test gets a fresh `native._state`, restored afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.kernels import native, switches

needs_compiler = pytest.mark.skipif(native.cxx_compiler() is None, reason="needs a C++ compiler")

GOOD_SOURCE = 'extern "C" int kiln_test_answer() { return 42; }\n'
BROKEN_SOURCE = 'extern "C" int kiln_test_answer() { return kiln_undeclared_name; }\n'


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_state", {"loaded": None, "reason": None, "error": None})


def _source(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "src" / "probe.cpp"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


@needs_compiler
@pytest.mark.parametrize("text, cflags, said", [
    (BROKEN_SOURCE, ["-O0"], "kiln_undeclared_name"),  # a compiler error in the source
    (GOOD_SOURCE, ["-O0", "-fkiln-bogus-flag"], "-fkiln-bogus-flag"),  # a flag this compiler rejects
], ids=["broken-source", "bogus-flag"])
def test_failed_build_raises_kiln_error_with_compiler_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, cflags: list[str], said: str
) -> None:
    name = f"kiln_test_broken_{len(cflags)}"  # one library name per case (torch versions names per process)
    with pytest.raises(KilnError) as info:
        native.build_and_load([_source(tmp_path, text)], tmp_path / "build", cflags, name=name)
    message = str(info.value)
    assert said in message  # the compiler's own words reach the user
    assert "KILN_NO_NATIVE=1" in message  # and how to run without the native kernels
    assert message.count("\n  | ") <= native._TAIL_LINES  # the tail of the log, not all of it
    assert native.BUILDING_LINE in capsys.readouterr().err


@needs_compiler
def test_building_line_only_when_a_build_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, build = _source(tmp_path, GOOD_SOURCE), tmp_path / "build"
    seconds = native.build_and_load([src], build, ["-O0"], name="kiln_test_good")
    err = capsys.readouterr().err.splitlines()
    assert seconds is not None and err[0] == native.BUILDING_LINE and "built in" in err[1] and len(err) == 2

    assert native.build_and_load([src], build, ["-O0"], name="kiln_test_good") is None  # cached: silent
    assert capsys.readouterr().err == ""

    edited = tmp_path / "edited" / "probe.cpp"  # an edited source is another key: a build is announced
    edited.parent.mkdir()
    edited.write_text(GOOD_SOURCE + "// edited\n")
    assert native.needs_build(native.build_folder([edited], build, ["-O0"], name="kiln_test_good"), "kiln_test_good")
    assert native.needs_build(native.build_folder([src], build, ["-O2"], name="kiln_test_good"), "kiln_test_good")


def test_no_compiler_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "kiln-no-such-compiler")
    monkeypatch.setattr(native, "build_and_load", _must_not_build)
    with switches.overridden(native=True):
        assert native.load_native() is False
        assert native.simd_path() == "none"
        status = native.native_status()
    assert status.startswith("plain-torch") and "no C++ compiler" in status and "kiln-no-such-compiler" in status


def test_switched_off_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "build_and_load", _must_not_build)
    with switches.overridden(native=False):
        assert native.load_native() is False
        assert "KILN_NO_NATIVE=1" in native.native_status()


def test_kiln_no_native_env_switches_it_off() -> None:
    assert switches.KernelConfig.from_env({"KILN_NO_NATIVE": "1"}).native is False


def test_failed_build_is_raised_again_without_rebuilding(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_build(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise KilnError("kiln's native kernels failed to build: boom")

    monkeypatch.setattr(native, "cxx_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(native, "build_and_load", failing_build)
    with switches.overridden(native=True):
        for _ in range(2):
            with pytest.raises(KilnError, match="boom"):
                native.load_native()
    assert len(calls) == 1  # a 2-minute failing build is not rerun on every kernel call


def _must_not_build(*args: object, **kwargs: object) -> None:
    raise AssertionError("no build should be attempted here")
