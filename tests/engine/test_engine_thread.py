"""kiln serve's engine decodes as fast as `LLM.generate` on the main thread (kiln issue 25).

Each mode runs in a fresh process (tests/engine/thread_probe.py), because which threads have entered
an OpenMP parallel region is process state: serve's way (the engine thread loads the model and runs
every step) against LLM.generate on the main thread, alternating, best of each. Before the fix,
`kiln serve` loaded the model on the main thread and stepped on a second one, and on a 2-core Xeon
decoded at ~0.5x the offline speed; the bound here is 1.3x.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("thread_probe.py")


def _probe(model: Path, mode: str) -> float:
    done = subprocess.run([sys.executable, str(PROBE), str(model), mode, "2"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["decode_tok_s"]


@pytest.mark.real_model
def test_serve_engine_thread_decodes_as_fast_as_the_main_thread(default_gguf_path: Path) -> None:
    rates: dict[str, list[float]] = {"offline": [], "serve": []}
    # Alternate, so a drift of the machine hits both modes alike; on a busy machine (other processes
    # on the same cores) add rounds, up to 4, until the best of each is within the bound. The bug this
    # guards against (two OpenMP teams) halves serve's speed in every round, so it still fails.
    for round_ in range(4):
        for mode in rates:
            rates[mode].append(_probe(default_gguf_path, mode))
        offline, serve = max(rates["offline"]), max(rates["serve"])
        if round_ >= 1 and offline / serve <= 1.3:
            break
    assert offline / serve <= 1.3, f"serve's engine thread decodes at {serve:.1f} tok/s, offline {offline:.1f} ({rates})"


def test_async_engine_loads_on_its_own_thread() -> None:
    """The factory runs on the engine thread, and a factory's error reaches the caller of start()."""
    import threading

    from kiln.engine.async_engine import AsyncEngine

    seen: list[str] = []

    def factory():
        seen.append(threading.current_thread().name)
        raise ValueError("no such model")

    engine = AsyncEngine(factory)
    with pytest.raises(ValueError, match="no such model"):
        engine.start()
    assert seen == ["kiln-engine"]
    assert not engine.is_alive()
