"""The AVX2 path of the quantized (and dense decode) matmul, checked on this machine whatever its own SIMD level.

The library is compiled for one instruction set (-march); an AVX-512 machine would never run the
AVX2 code. Here it is built a second time with KILN_KERNEL_MARCH=haswell (AVX2 + FMA + F16C, its
own build folder) in a child process, which runs the kernel-vs-twin tests against that build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.kernels.native import load_native, simd_path

ROOT = Path(__file__).resolve().parent.parent


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


CPU = _cpu_flags()


@pytest.mark.skipif(not load_native(), reason="native kernels unavailable (no compiler)")
def test_this_build_runs_the_widest_path_the_cpu_has() -> None:
    expected = "AVX-512" if {"avx512f", "avx512bw", "f16c"} <= CPU else "AVX2" if {"avx2", "fma", "f16c"} <= CPU else "scalar"
    if os.environ.get("KILN_PORTABLE_KERNELS") == "1":
        expected = "scalar"
    assert simd_path() == expected


@pytest.mark.skipif(not load_native(), reason="native kernels unavailable (no compiler)")
@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= CPU, reason="this CPU cannot execute AVX2 code")
def test_avx2_build_equals_the_reference() -> None:
    env = {**os.environ, "KILN_KERNEL_MARCH": "haswell", "OMP_NUM_THREADS": "2"}
    env.pop("KILN_PORTABLE_KERNELS", None)
    check = subprocess.run([sys.executable, "-c", "from kiln.kernels.native import simd_path; print(simd_path())"],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert check.stdout.strip() == "AVX2", check.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "tests/test_quant_kernels.py",
                          "tests/test_kquant_kernels.py",  # the K-quant super-block kernels' AVX2 tiles too
                          "tests/test_dense_matmul.py",  # and the dense decode kernel's
                          "-k", "native_matmul_equals_reference or native_dequantize_equals_reference or fused_linear"
                                " or native_kquant or kernel_matches_the_twin or a_row_does_not_depend"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, summary
