"""Web UI fixtures: one real engine on the default model, a real uvicorn server running the full app
(API + pages), and a headless Chromium driven by selenium.

The browser is Debian's `chromium` + `chromium-driver` (no browser is downloaded at test time); where
either, or selenium, is missing the browser tests skip and say how to get them.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kiln.engine.arg_utils import EngineArgs
from kiln.engine.async_engine import AsyncEngine

MODEL = "kiln-ui-test"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
INSTALL_HINT = ("browser tests need Debian's chromium and chromium-driver "
                "(apt-get install -y --no-install-recommends chromium chromium-driver) and selenium (the test extra)")


@pytest.fixture(scope="session")
def ui_engine(default_gguf_path: Path) -> Iterator[AsyncEngine]:
    ae = AsyncEngine.from_engine_args(EngineArgs(model=str(default_gguf_path), kv_cache_memory=256 << 20))
    yield ae
    ae.shutdown(timeout=5.0)


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


@pytest.fixture(scope="session")
def ui_url(ui_engine: AsyncEngine) -> Iterator[str]:
    from kiln.entrypoints.openai.api_server import build_app

    with serve(build_app(ui_engine, MODEL)) as url:
        yield url


def _browser_paths() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip(INSTALL_HINT + ": selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(INSTALL_HINT + f": {'chromium' if not chromium else 'chromedriver'} not found on PATH")
    return chromium, driver


@pytest.fixture(scope="session")
def _driver_session() -> Iterator[Any]:
    from selenium import webdriver

    chromium, driver_path = _browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--disable-extensions", "--no-first-run", "--disable-background-networking"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, checked after each test
    # an explicit driver path: selenium never looks for (or downloads) a driver itself
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture()
def browser(_driver_session: Any, ui_url: str) -> Iterator[Any]:
    """The session's Chromium with a clean slate: this origin's localStorage emptied, window resized."""
    drv = _driver_session
    drv.get(ui_url + "/ui/static/ui.css")
    drv.execute_script("localStorage.clear()")
    drv.set_window_size(1280, 860)
    drv.get_log("browser")  # drop what earlier tests left
    yield drv
    errors = [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE" and "status of 401" not in e["message"]]
    assert not errors, f"the page logged errors: {errors}"


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
