"""Build llama.cpp's C++ peers (`llama-bench`, `llama-server`, `llama-quantize`, `llama-perplexity`) for this CPU,
outside the repository.

The sources are the llama.cpp tree vendored in the `llama-cpp-python` sdist (pinned below, fetched
from the package index: the only network these machines have). The build goes to
`$KILN_HOME/peers/llama.cpp-<version>-<flags digest>/` and is reused while the sdist version and the
flags are the same; `build_info.json` there says which build ran, and every benchmark that runs a
peer copies it into its result file.

Flags, chosen per CPU from /proc/cpuinfo:
- no AMX: `-DGGML_NATIVE=ON` (llama.cpp's own choice for the machine it is built on);
- AMX present: `-DGGML_NATIVE=OFF` with AVX-512 / VNNI / BF16 on and every AMX switch off, because the
  native build's AMX matmul faults in `ldtilecfg` on the Intel machines here
  (`ggml_backend_amx_mul_mat`). The result file says so.

    python benchmarks/build_llama_cpp.py            # build (about 10 minutes on 2 cores) and print the paths
    python benchmarks/build_llama_cpp.py --print    # print the paths of an existing build, build nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; vendors llama.cpp build 0c1e570
# llama-quantize / llama-perplexity are the reference tools of the K-quant quality rows
# (benchmarks/kquant_quality.py) and of the test that llama.cpp loads a kiln-written K-quant file
TARGETS = ("llama-bench", "llama-server", "llama-quantize", "llama-perplexity")
COMMON_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_OPENMP=ON"]


def cpu_flags() -> set[str]:
    """The ISA flags that decide the build (AMX among them), as kiln's tuning fingerprint reads them."""
    from kiln.kernels.tune import cpu_identity

    return set(cpu_identity()[1])


def build_flags(flags: set[str]) -> tuple[list[str], str]:
    """(cmake flags, why) for this CPU."""
    if "amx_tile" in flags:
        isa = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
               "-DGGML_AVX512=ON", f"-DGGML_AVX512_VNNI={'ON' if 'avx512_vnni' in flags else 'OFF'}",
               f"-DGGML_AVX512_BF16={'ON' if 'avx512_bf16' in flags else 'OFF'}",
               "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
        return isa, "AMX CPU: explicit AVX-512/VNNI/BF16, AMX off (the native build's AMX matmul faults here)"
    return ["-DGGML_NATIVE=ON"], "no AMX: GGML_NATIVE=ON (llama.cpp's default for the build machine)"


def build_dir(flags: list[str]) -> Path:
    from kiln.hub import kiln_home

    digest = hashlib.sha256(json.dumps([VERSION, *COMMON_FLAGS, *flags]).encode()).hexdigest()[:12]
    return kiln_home() / "peers" / f"llama.cpp-{VERSION}-{digest}"


def binaries(root: Path, targets: tuple[str, ...] = TARGETS) -> dict[str, Path]:
    return {t: root / "build" / "bin" / t for t in targets}


def existing(root: Path, targets: tuple[str, ...] = ("llama-bench", "llama-server")) -> dict[str, Path] | None:
    """The paths of `targets` in the build at `root`, or None when any is missing (a build made before
    a target joined TARGETS lacks it until this script runs again: cmake then builds only what is new)."""
    bins = binaries(root, targets)
    return bins if (root / "build_info.json").is_file() and all(p.is_file() for p in bins.values()) else None


def fetch_sources(root: Path) -> Path:
    """The sdist's vendored llama.cpp tree under root/src."""
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                        f"llama-cpp-python=={VERSION}"], check=True)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        vendored = Path(tmp) / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(vendored, src)
    return src


def build(jobs: int) -> dict[str, Path]:
    flags, why = build_flags(cpu_flags())
    root = build_dir(flags)
    found = existing(root, TARGETS)
    if found:
        return found
    root.mkdir(parents=True, exist_ok=True)
    src = fetch_sources(root)
    out = root / "build"
    t0 = time.time()
    subprocess.run(["cmake", "-S", str(src), "-B", str(out), *COMMON_FLAGS, *flags], check=True)
    subprocess.run(["cmake", "--build", str(out), "--config", "Release", "-j", str(jobs), "--target", *TARGETS],
                   check=True)
    seconds, when = round(time.time() - t0), time.strftime("%Y-%m-%d %H:%M")
    info_file = root / "build_info.json"
    if info_file.is_file():  # an older build gained targets: keep what it recorded, say what was added
        info = json.loads(info_file.read_text())
        added = sorted(set(TARGETS) - set(info.get("binaries", {})))
        info.setdefault("added", []).append({"targets": added, "build_seconds": seconds, "built": when})
    else:
        info = {"llama_cpp_python": VERSION, "cmake_flags": COMMON_FLAGS + flags, "why": why,
                "build_seconds": seconds, "built": when}
    info["binaries"] = {k: str(v) for k, v in binaries(root).items()}
    info_file.write_text(json.dumps(info, indent=1))
    return binaries(root)


def build_info(binary: Path) -> dict:
    """What a peer binary is: the build_info.json of a build made here, or what its CMakeCache says."""
    root = binary.resolve().parent.parent.parent
    info_file = root / "build_info.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    cache = binary.resolve().parent.parent / "CMakeCache.txt"
    keep = ("GGML_NATIVE", "GGML_AVX512", "GGML_AMX", "CMAKE_BUILD_TYPE", "GGML_OPENMP")
    flags = [line for line in cache.read_text().splitlines() if line.startswith(keep)] if cache.is_file() else []
    return {"binary": str(binary), "cmake_cache": flags, "note": "built outside this script"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print an existing build's paths; build nothing")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    flags, _ = build_flags(cpu_flags())
    bins = existing(build_dir(flags), TARGETS) if args.print else build(args.jobs)
    if bins is None:
        sys.exit(f"no build in {build_dir(flags)}: run without --print")
    print(json.dumps({k: str(v) for k, v in bins.items()}))


if __name__ == "__main__":
    main()
