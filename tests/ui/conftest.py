"""Web UI fixtures: one real engine on the default model, a real uvicorn server running the full app
(API + pages), and a headless Chromium driven by selenium.

The browser is Debian's `chromium` + `chromium-driver` (no browser is downloaded at test time); where
either, or selenium, is missing the browser tests skip and say how to get them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.engine.arg_utils import EngineArgs
from kiln.engine.async_engine import AsyncEngine

from .ui_helpers import INSTALL_HINT, MODEL, serve


@pytest.fixture(scope="session")
def ui_engine(default_gguf_path: Path) -> Iterator[AsyncEngine]:
    ae = AsyncEngine.from_engine_args(EngineArgs(model=str(default_gguf_path), kv_cache_memory=256 << 20))
    yield ae
    ae.shutdown(timeout=5.0)


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
