"""Helpers for the web UI tests: a uvicorn server in a thread, screenshots, polling."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from server.conftest import serve_in_thread as serve  # noqa: F401  (the UI tests run the server tests' one)

MODEL = "kiln-ui-test"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
INSTALL_HINT = ("browser tests need Debian's chromium and chromium-driver "
                "(apt-get install -y --no-install-recommends chromium chromium-driver) and selenium (the test extra)")


def screenshot(drv: Any, name: str, full_page: bool = False) -> Path:
    """Write benchmarks/results/ui_NAME.png (checked in; the README shows them)."""
    path = SCREENSHOTS / f"ui_{name}.png"
    if full_page:
        height = min(int(drv.execute_script("return document.documentElement.scrollHeight")), 2400)
        drv.set_window_size(1280, max(height, 860))
    drv.save_screenshot(str(path))
    return path


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
