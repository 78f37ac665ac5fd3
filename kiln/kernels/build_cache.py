"""Where a native kernel build lives: one folder per binary, keyed by everything that changes it.

A folder's name is a digest of
- the C++ sources and headers (their bytes, not their paths or times: two clones of one commit share
  a build, a different commit that changed a kernel gets its own),
- the compile and link flags,
- the compiler (its `--version` line), torch's version and C++ ABI, and the Python version,
- the *target instruction set*: the feature macros (`__AVX512F__`, `__AVX512VNNI__`, `__AMX_TILE__`, …)
  the compiler defines for the build's `-march`, beyond those of its baseline target. For
  `-march=native` this is this CPU's feature set as the compiler sees it, so a home directory or
  cache volume reused on another CPU resolves to another folder and builds there; it never loads a
  library compiled for instructions it lacks (SIGILL). The CPU's model name plays no part: two
  machines with the same features share one build.

Each folder holds `build_info.json` (what went into the key, when it was built and last used), which
`kiln cache ls` shows and `kiln cache clean` uses. Invariant: a library is loaded only from the
folder whose key this process computes, and only when its recorded target features are a subset of
the features this CPU has (`host_features()`), so a copied or hand-placed folder cannot slip through.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

BUILD_INFO = "build_info.json"
_FEATURE_MACRO = re.compile(r"#define __([A-Z0-9_]+)__ ")  # upper-case feature macros; tune/arch names are lower case


@dataclass(frozen=True)
class BuildKey:
    """Everything that changes the compiled library; `digest` names its folder."""

    sources_sha256: str
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    compiler: str
    torch_version: str
    cxx11_abi: bool
    python: str
    target_features: tuple[str, ...]

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def folder_name(self, library: str) -> str:
        return f"{library}-{self.digest}"


def sources_digest(sources: Sequence[Path]) -> str:
    """sha256 over the sources and every header beside them (content and file name, in name order)."""
    files = {p.resolve() for p in sources}
    for folder in {p.parent for p in sources}:
        files.update(h.resolve() for h in folder.glob("*.h"))
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _predefined_macros(compiler: str, flags: Sequence[str]) -> str:
    result = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True,
                            text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{compiler} {' '.join(flags)} -dM -E failed: {result.stderr.strip()[-400:]}")
    return result.stdout


@lru_cache(maxsize=8)
def target_features(compiler: str, march_flags: tuple[str, ...]) -> tuple[str, ...]:
    """The instruction-set feature macros the compiler enables for `march_flags` beyond its baseline.

    ('AVX2', 'AVX512F', 'AVX512VNNI', 'FMA', …), sorted. Empty when the flags add nothing (a
    portable build). Two compiler runs of a few milliseconds each, cached per process."""
    if not march_flags:
        return ()
    baseline = set(_FEATURE_MACRO.findall(_predefined_macros(compiler, [])))
    targeted = set(_FEATURE_MACRO.findall(_predefined_macros(compiler, list(march_flags))))
    return tuple(sorted(targeted - baseline))


def host_features(compiler: str) -> tuple[str, ...]:
    """This CPU's features, as the compiler's `-march=native` sees them."""
    return target_features(compiler, ("-march=native",))


@lru_cache(maxsize=8)
def compiler_identity(compiler: str) -> str:
    """The compiler's `--version` first line (a compiler upgrade is a different binary)."""
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=False)
    first = (result.stdout or result.stderr).strip().splitlines()
    return f"{Path(compiler).name}: {first[0] if first else 'unknown'}"


def make_key(sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str], compiler: str) -> BuildKey:
    march = tuple(f for f in cflags if f.startswith("-m"))  # -march=…, -mavx512f, -mno-amx-tile: the target ISA
    return BuildKey(
        sources_sha256=sources_digest(sources),
        cflags=tuple(cflags),
        ldflags=tuple(ldflags),
        compiler=compiler_identity(compiler),
        torch_version=torch.__version__,
        cxx11_abi=bool(torch.compiled_with_cxx11_abi()),
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        target_features=target_features(compiler, march),
    )


def build_root() -> Path:
    from kiln.hub import kiln_home

    return kiln_home() / "build"


def write_build_info(folder: Path, key: BuildKey, seconds: float, library: str) -> None:
    """Record a finished build (written last: its presence means the library in `library` is complete)."""
    info = {"key": asdict(key), "digest": key.digest, "library": library, "built_at": time.time(),
            "build_seconds": round(seconds, 1), "last_used": time.time()}
    tmp = folder / (BUILD_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(folder / BUILD_INFO)  # atomic: a reader never sees half a file


def read_build_info(folder: Path) -> dict[str, object] | None:
    try:
        info = json.loads((folder / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def touch_last_used(folder: Path) -> None:
    """Record that this folder's library was loaded (best effort: a read-only cache still loads)."""
    info = read_build_info(folder)
    if info is None:
        return
    info["last_used"] = time.time()
    try:
        tmp = folder / (BUILD_INFO + f".{id(info)}.tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(folder / BUILD_INFO)
    except OSError:
        pass


def missing_features(info: dict[str, object], host: Sequence[str]) -> list[str]:
    """Target features a recorded build needs that this CPU lacks (empty: safe to load)."""
    key = info.get("key")
    needed = key.get("target_features", []) if isinstance(key, dict) else []
    return sorted(set(needed) - set(host))  # type: ignore[arg-type]


@dataclass(frozen=True)
class CachedBuild:
    """One folder under the build root, as `kiln cache ls` shows it."""

    path: Path
    size_bytes: int
    info: dict[str, object] | None  # None: an older kiln's folder (keyed by torch and Python only)

    @property
    def last_used(self) -> float:
        if self.info and isinstance(self.info.get("last_used"), (int, float)):
            return float(self.info["last_used"])  # type: ignore[arg-type]
        return self.path.stat().st_mtime


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_builds(root: Path | None = None) -> list[CachedBuild]:
    root = build_root() if root is None else root
    if not root.is_dir():
        return []
    return [CachedBuild(p, folder_size(p), read_build_info(p)) for p in sorted(root.iterdir()) if p.is_dir()]


def remove_builds(builds: Sequence[CachedBuild]) -> int:
    """Delete the given build folders; the bytes freed."""
    freed = 0
    for build in builds:
        freed += build.size_bytes
        shutil.rmtree(build.path, ignore_errors=True)
    return freed
