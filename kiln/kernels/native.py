"""Build and load kiln's C++ kernels (compiled on first use against the installed torch).

The library is compiled with `torch.utils.cpp_extension.load` into $KILN_HOME/build and
cached there; later processes load it in well under a second. A build prints one line to
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
import sys
import threading
import time
from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.kernels import switches

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ["paged_attention.cpp", "prefill_attention.cpp", "fused_ops.cpp", "quant_gemm.cpp", "decode_step.cpp"]
_LIB_NAME = "kiln_native"
_TAIL_LINES = 20  # compiler lines kept in a build error: the first error and its context, not the full log
BUILDING_LINE = "kiln: building kiln's native kernels for this CPU (first run only, ~2 min)…"
_STAMP = "kiln_build_flags.txt"  # the flags the cached library was built with (a change means a rebuild)
_lock = threading.Lock()
# loaded: None until the first attempt, then True/False; reason: why False; error: the KilnError a
# failed build raised (kept, so later calls re-raise it instead of re-running a failing build).
_state: dict[str, object] = {"loaded": None, "reason": None, "error": None}


def _build_dir() -> Path:
    from kiln.hub import kiln_home

    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    march = _march()
    if march != "native":
        tag += f"-{march}"  # a build for another instruction set must not replace the native one
    path = kiln_home() / "build" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    flags = ["-O3", "-fopenmp"]
    if os.environ.get("KILN_PORTABLE_KERNELS") != "1":
        flags.append(f"-march={_march()}")
    return flags


def cxx_compiler() -> str | None:
    """The C++ compiler torch's extension builder would run ($CXX, else `c++`), or None if absent."""
    words = shlex.split(os.environ.get("CXX", "c++"))  # $CXX may be "ccache g++": the first word runs
    return shutil.which(words[0]) if words else None


def needs_build(build_dir: Path, sources: list[Path], cflags: list[str], name: str = _LIB_NAME) -> bool:
    """Whether loading will compile: no cached library, a source or header newer than it, or other flags.

    A prediction of what ninja will decide (it is asked only to announce the build), so it errs
    towards "yes" on anything it cannot see."""
    library = build_dir / f"{name}.so"
    stamp = build_dir / _STAMP
    if not library.is_file() or not stamp.is_file() or stamp.read_text() != _stamp_text(cflags):
        return True
    inputs = [*sources, *(p for d in {s.parent for s in sources} for p in d.glob("*.h"))]
    built = library.stat().st_mtime
    return any(p.stat().st_mtime > built for p in inputs)


def _stamp_text(cflags: list[str]) -> str:
    return f"torch {torch.__version__}\ncflags {' '.join(cflags)}\n"


def build_and_load(sources: list[Path], build_dir: Path, cflags: list[str], name: str = _LIB_NAME) -> float | None:
    """Compile (when needed) and load a kernel library into torch.ops; seconds spent building, or None
    when the cached library was loaded. Raises KilnError with the compiler's last lines on failure.

    Parameters exist so tests can build a tiny or broken source in a temporary folder."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    building = needs_build(build_dir, sources, cflags, name)
    if building:
        print(BUILDING_LINE, file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        load(name=name, sources=[str(s) for s in sources], extra_include_paths=[str(s.parent) for s in sources[:1]],
             extra_ldflags=["-fopenmp"], extra_cflags=cflags, build_directory=str(build_dir),
             is_python_module=False, verbose=False)
    except Exception as exc:  # a compiler error, ninja missing, a library that will not load
        raise _build_error(exc, build_dir) from exc
    seconds = time.perf_counter() - start
    if building:
        (build_dir / _STAMP).write_text(_stamp_text(cflags))
        print(f"kiln: native kernels built in {seconds:.0f} s (cached in {build_dir})", file=sys.stderr, flush=True)
        return seconds
    return None


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
            build_and_load([_CSRC / s for s in _SOURCES], _build_dir(), _cflags())
        except KilnError as exc:
            _state.update(loaded=False, reason="build failed", error=exc)
            raise
        from kiln.kernels.fake_impls import register_fake_impls

        register_fake_impls()  # so torch.compile can trace through the ops
        _state.update(loaded=True, reason=None)
        return True


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
