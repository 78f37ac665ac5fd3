"""Kernel switches: which fast paths the kernels may take, decided once per process.

The kernels used to read environment variables (`KILN_FUSED`, `KILN_FUSED_STEP`, ...) on every call.
Now the engine builds one `KernelConfig` (from `EngineArgs`: CLI flags, `LLM(...)` keyword
arguments, with the environment variables as defaults) and installs it with `configure`; kernels
read `active()`, which costs an attribute lookup. Code that runs kernels without an engine
(tests, benchmarks, `kiln eval`) gets the environment's switches, read the first time they are asked.

Invariant: every switch only chooses between a fast path and its plain-torch twin, which compute the
same thing (bit for bit, or within the tolerance the twin's test states); no switch changes what a
model means.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

PREFILL_ATTENTION_CHOICES = ("native", "sdpa")


@dataclass(frozen=True)
class KernelConfig:
    """Which kernel paths may run (each False/"sdpa" falls back to the plain-torch twin).

    Environment variable → field (the CLI flag in brackets):
      KILN_NO_NATIVE=1          → native=False            [--no-native-kernels]
      KILN_FUSED=0              → fused_ops=False         [--no-fused-ops]
      KILN_FUSED_STEP=0         → fused_decode_step=False [--no-fused-decode-step]
      KILN_QUANT_KERNELS=0      → quant_kernels=False     [--no-quant-kernels]
      KILN_PREFILL_ATTENTION=sdpa → prefill_attention="sdpa" [--prefill-attention sdpa]
    """

    native: bool = True  # build/load the C++ kernel library at all
    fused_ops: bool = True  # native add+RMSNorm and in-place RoPE
    fused_decode_step: bool = True  # a pure decode batch's decoder stack in one native call
    quant_kernels: bool = True  # GGUF/INT blocks through kiln's block/panel matmul kernels
    prefill_attention: str = "native"  # "native": kiln's paged flash kernel; "sdpa": gather + torch SDPA

    def __post_init__(self) -> None:
        if self.prefill_attention not in PREFILL_ATTENTION_CHOICES:
            raise ValueError(f"prefill_attention must be one of {', '.join(PREFILL_ATTENTION_CHOICES)}; "
                             f"got {self.prefill_attention!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "KernelConfig":
        """The switches the environment variables name (unset ones keep their defaults)."""
        env = os.environ if environ is None else environ
        return cls(
            native=env.get("KILN_NO_NATIVE", "0") != "1",
            fused_ops=env.get("KILN_FUSED", "1") != "0",
            fused_decode_step=env.get("KILN_FUSED_STEP", "1") != "0",
            quant_kernels=env.get("KILN_QUANT_KERNELS", "1") != "0",
            prefill_attention=env.get("KILN_PREFILL_ATTENTION", "native"),
        )


_active: KernelConfig | None = None


def active() -> KernelConfig:
    """The switches in force (the environment's until an engine calls `configure`)."""
    global _active
    if _active is None:
        _active = KernelConfig.from_env()
    return _active


def configure(config: KernelConfig) -> None:
    """Install the switches for this process (the engine does this once, before loading a model)."""
    global _active
    _active = config


@contextmanager
def overridden(**changes: object) -> Iterator[KernelConfig]:
    """Run a block with some switches changed (tests and benchmarks compare paths this way)."""
    global _active
    before = active()
    _active = replace(before, **changes)  # type: ignore[arg-type]
    try:
        yield _active
    finally:
        _active = before
