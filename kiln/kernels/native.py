"""Build and load kiln's C++ kernels (compiled on first use against the installed torch).

The library is compiled with `torch.utils.cpp_extension.load` into $KILN_HOME/build and
cached there; later processes load it in well under a second. If no compiler is present
(or KILN_NO_NATIVE=1), `load_native()` returns False and callers use the plain-torch
reference paths instead — slower, never wrong. `native_status()` says which it is.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ["paged_attention.cpp", "prefill_attention.cpp", "fused_ops.cpp", "quant_gemm.cpp", "decode_step.cpp"]
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "error": None}


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


def load_native() -> bool:
    """Compile (first time) and load the kernel library; True when torch.ops.kiln is usable."""
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        if os.environ.get("KILN_NO_NATIVE") == "1":
            _state.update(loaded=False, error="disabled by KILN_NO_NATIVE=1")
            return False
        try:
            from torch.utils.cpp_extension import load

            # -fopenmp: at::parallel_for is header code and runs serially without it.
            flags = ["-O3", "-fopenmp"]
            if os.environ.get("KILN_PORTABLE_KERNELS") != "1":
                flags.append(f"-march={_march()}")
            load(
                name="kiln_native",
                sources=[str(_CSRC / s) for s in _SOURCES],
                extra_include_paths=[str(_CSRC)],
                extra_ldflags=["-fopenmp"],
                extra_cflags=flags,
                build_directory=str(_build_dir()),
                is_python_module=False,
                verbose=False,
            )
            from kiln.kernels.fake_impls import register_fake_impls

            register_fake_impls()  # so torch.compile can trace through the ops
            _state.update(loaded=True, error=None)
        except Exception as exc:  # no compiler, no ninja, ... → reference paths
            _state.update(loaded=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return bool(_state["loaded"])


def simd_path() -> str:
    """The quantized-matmul SIMD path of the loaded library: 'AVX-512', 'AVX2' or 'scalar'."""
    if not load_native():
        return "none"
    return {512: "AVX-512", 256: "AVX2"}.get(int(torch.ops.kiln.quant_simd_level()), "scalar")


def native_status() -> str:
    """One line for `kiln info`: which attention path is in use and why."""
    if load_native():
        return f"native C++ kernels (torch.ops.kiln, {simd_path()} quantized matmul)"
    return f"plain-torch reference kernels ({_state['error']})"
