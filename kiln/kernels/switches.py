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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from kiln.config import KernelConfig

__all__ = ["KernelConfig", "active", "configure", "overridden"]

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
