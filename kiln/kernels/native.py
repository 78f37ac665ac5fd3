"""Build and load kiln's C++ kernels (compiled on first use against the installed torch).

The library is compiled with `torch.utils.cpp_extension.load` into a folder of $KILN_HOME/build
keyed by its sources, flags, compiler, torch and the CPU features it targets (`build_cache`), under a
lock that never waits on a dead builder (`build_lock`); later processes with the same key, from any
checkout, load it in well under a second, and a CPU with other features builds its own. A build prints one line to
stderr before it starts and one when it is done (first run only, ~2 minutes on 2 cores).

When the native kernels are not used, callers run the plain-torch reference paths instead
(slower, never wrong). That happens only for a reason the user can see in `native_status()`:
- they switched it off (KILN_NO_NATIVE=1, or `--no-native-kernels` through kernels.switches), or
- there is no C++ compiler at all (the one torch would use: $CXX, else `c++`).
Anything else that goes wrong (a compiler error, ninja missing, a library that will not load)
raises a `KilnError` carrying the compiler's last lines: silently running 5-10x slower would
hide a broken install.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.kernels import switches
from kiln.kernels.build_cache import (
    BuildKey, build_root, host_features, make_key, missing_features, read_build_info, touch_last_used, write_build_info,
)
from kiln.kernels.build_lock import BuildLock

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ["paged_attention.cpp", "prefill_attention.cpp", "fused_ops.cpp", "quant_gemm.cpp", "kquant_gemm.cpp", "decode_step.cpp", "gemma3_decode_step.cpp", "dense_gemv.cpp"]
_LIB_NAME = "kiln_native"
_TAIL_LINES = 20  # compiler lines kept in a build error: the first error and its context, not the full log
BUILDING_LINE = "kiln: building kiln's native kernels for this CPU (first run only, ~2 min)…"
_lock = threading.Lock()
# loaded: None until the first attempt, then True/False; reason: why False; error: the KilnError a
# failed build raised (kept, so later calls re-raise it instead of re-running a failing build).
_state: dict[str, object] = {"loaded": None, "reason": None, "error": None}


def _march() -> str:
    """The -march the library is compiled for: 'native' (this CPU) unless KILN_KERNEL_MARCH names
    another (e.g. 'haswell' builds the AVX2 paths on an AVX-512 machine, which the tests use to
    check them against their twins)."""
    march = os.environ.get("KILN_KERNEL_MARCH", "native")
    if not march.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"KILN_KERNEL_MARCH must be a -march name such as native or haswell, got {march!r}")
    return march


def _cflags() -> list[str]:
    # -fopenmp: at::parallel_for is header code and runs serially without it.
    # -ffp-contract=off: GCC would otherwise fuse a scalar `a += b * c` into an FMA in some template
    # instantiations of a kernel and not in others, so one output row could round differently depending on
    # how many activation rows shared its tile; speculative verification (k + 1 rows) must reproduce decode
    # (1 row) bit for bit. The SIMD loops use explicit FMA intrinsics and are unaffected.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if os.environ.get("KILN_PORTABLE_KERNELS") != "1":
        flags.append(f"-march={_march()}")
    return flags


def cxx_compiler() -> str | None:
    """The C++ compiler torch's extension builder would run ($CXX, else `c++`), or None if absent."""
    words = shlex.split(os.environ.get("CXX", "c++"))  # $CXX may be "ccache g++": the first word runs
    return shutil.which(words[0]) if words else None


def _ldflags() -> list[str]:
    return ["-fopenmp"]


def _key(sources: list[Path], cflags: list[str], name: str) -> tuple[str, BuildKey]:
    """The compiler and the build key of `name` from these sources and flags (see build_cache)."""
    compiler = cxx_compiler()
    if compiler is None:
        raise KilnError(f"kiln: no C++ compiler ({os.environ.get('CXX', 'c++')} is not on PATH) to build {name}")
    try:
        return compiler, make_key(sources, cflags, _ldflags(), compiler)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # a compiler that cannot even preprocess
        raise KilnError(f"kiln: could not ask the C++ compiler {compiler} which CPU features it targets ({exc}); "
                        "fix the toolchain, or set KILN_NO_NATIVE=1 to run on the plain-torch kernels") from exc


def build_folder(sources: list[Path], build_root: Path, cflags: list[str], name: str = _LIB_NAME) -> Path:
    """The folder this process builds and loads `name` in: `build_root/<name>-<key digest>` (see build_cache)."""
    return build_root / _key(sources, cflags, name)[1].folder_name(name)


def needs_build(folder: Path, name: str = _LIB_NAME) -> bool:
    """Whether loading from `folder` will compile: no finished library there (a library and its
    build_info.json, written only after a successful build). Sources and flags are in the folder's
    key, so a changed source or flag means another folder, never a stale library."""
    return _built_library(folder) is None


def _built_library(folder: Path, info: dict[str, object] | None = None) -> Path | None:
    """The finished library in `folder` (named in its build_info.json, or in `info` read from it), or None."""
    info = read_build_info(folder) if info is None else info
    library = folder / str(info.get("library", "")) if info else None
    return library if library is not None and library.suffix == ".so" and library.is_file() else None


def build_and_load(sources: list[Path], build_root: Path, cflags: list[str], name: str = _LIB_NAME) -> float | None:
    """Compile (when needed) and load a kernel library into torch.ops; seconds spent building, or None
    when the cached library was loaded. Raises KilnError with the compiler's last lines on failure.

    The library lives in a folder keyed by sources, flags, compiler, torch and target CPU features
    (build_cache); a finished one is loaded directly, without running torch's builder (whose ninja
    file records this checkout's paths and would rebuild for another clone of the same sources).
    Parameters exist so tests can build a tiny or broken source in a temporary folder."""
    compiler, key = _key(sources, cflags, name)
    folder = build_root / key.folder_name(name)
    with BuildLock(folder):
        info = read_build_info(folder)
        library = _built_library(folder, info) if info is not None else None
        if library is not None and info is not None:
            missing = missing_features(info, host_features(compiler))
            if missing:  # a hand-copied folder: the key should have kept it apart
                raise KilnError(f"kiln: the native kernels in {folder} were built for CPU features this CPU lacks "
                                f"({', '.join(missing)}); delete that folder (`kiln cache clean --all`) and run again")
            try:
                torch.ops.load_library(str(library))
            except Exception as exc:  # a truncated or foreign file: say so rather than run without kernels
                raise _build_error(exc, folder) from exc
            touch_last_used(folder)
            return None
        return _build(sources, folder, cflags, name, key)


def _build(sources: list[Path], folder: Path, cflags: list[str], name: str, key: BuildKey) -> float:
    from torch.utils.cpp_extension import load

    print(BUILDING_LINE, file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        load(name=name, sources=[str(s) for s in sources], extra_include_paths=[str(s.parent) for s in sources[:1]],
             extra_ldflags=_ldflags(), extra_cflags=cflags, build_directory=str(folder),
             is_python_module=False, verbose=False)
    except Exception as exc:  # a compiler error, ninja missing, a library that will not load
        raise _build_error(exc, folder) from exc
    seconds = time.perf_counter() - start
    # torch names a second library of one name in one process name_v1 (tests do that): record which file it wrote.
    library = max(folder.glob(f"{name}*.so"), key=lambda p: p.stat().st_mtime)
    write_build_info(folder, key, seconds, library.name)
    print(f"kiln: native kernels built in {seconds:.0f} s (cached in {folder})", file=sys.stderr, flush=True)
    return seconds


def _build_error(exc: Exception, build_dir: Path) -> KilnError:
    """A KilnError that shows what the compiler said and how to run without the native kernels."""
    # Compile commands run to thousands of characters; the compiler's messages are the short lines.
    lines = [ln if len(ln) <= 240 else ln[:240] + " …" for ln in str(exc).splitlines() if ln.strip()]
    tail = "\n".join(f"  | {ln}" for ln in lines[-_TAIL_LINES:]) or f"  | {type(exc).__name__}"
    return KilnError(
        f"kiln's native kernels failed to build or load ({type(exc).__name__}); last lines:\n{tail}\n"
        "Fix the toolchain (a C++17 compiler with OpenMP, `pip install ninja`) and run again "
        f"(build folder {build_dir}), or set KILN_NO_NATIVE=1 to run on the plain-torch kernels (slower, same results)."
    )


def load_native() -> bool:
    """Compile (first time) and load the kernel library; True when torch.ops.kiln is usable.

    False only when switched off or when no C++ compiler exists (`native_status()` says which);
    a failed build raises KilnError, the same one on every later call."""
    if not switches.active().native:
        # Read on every call (an attribute lookup): a switch turned off after loading still holds.
        return False
    if _state["loaded"] is True:
        return True  # the per-kernel-call path: no lock once loaded
    with _lock:
        if isinstance(_state["error"], KilnError):
            raise _state["error"]
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        if cxx_compiler() is None:
            _state.update(loaded=False, reason=f"no C++ compiler: {os.environ.get('CXX', 'c++')} is not on PATH")
            return False
        try:
            build_and_load([_CSRC / s for s in _SOURCES], build_root(), _cflags())
        except KilnError as exc:
            _state.update(loaded=False, reason="build failed", error=exc)
            raise
        from kiln.kernels.fake_impls import register_fake_impls

        register_fake_impls()  # so torch.compile can trace through the ops
        _state.update(loaded=True, reason=None)
        return True


def current_build_folder() -> Path | None:
    """The folder this process loads kiln's kernels from (built or not), or None without a compiler."""
    if cxx_compiler() is None:
        return None
    return build_folder([_CSRC / s for s in _SOURCES], build_root(), _cflags())


def simd_path() -> str:
    """The quantized-matmul SIMD path of the loaded library: 'AVX-512', 'AVX2' or 'scalar'."""
    if not load_native():
        return "none"
    return {512: "AVX-512", 256: "AVX2"}.get(int(torch.ops.kiln.quant_simd_level()), "scalar")


def native_status() -> str:
    """One line for `kiln info` and the engine's startup: which kernels run and, if plain torch, why.

    Loads (or builds) the library like any kernel call would, so it may raise the build's KilnError."""
    if load_native():
        return f"native C++ kernels (torch.ops.kiln, {simd_path()} quantized matmul)"
    if not switches.active().native:
        return "plain-torch reference kernels (native kernels switched off: KILN_NO_NATIVE=1 or --no-native-kernels)"
    return f"plain-torch reference kernels ({_state['reason']})"
