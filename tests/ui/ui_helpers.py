"""Helpers for the web UI tests: a uvicorn server in a thread, screenshots, polling."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MODEL = "kiln-ui-test"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
INSTALL_HINT = ("browser tests need Debian's chromium and chromium-driver "
                "(apt-get install -y --no-install-recommends chromium chromium-driver) and selenium (the test extra)")


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """A uvicorn server for `app` on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()



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
