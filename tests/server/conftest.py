"""Server fixtures: one real engine (the default model, fp32) for the whole server suite, and
real uvicorn servers on free loopback ports in background threads, talking to it.

The apps run with lifespan="off" so several of them (with and without an API key) can share
the one AsyncEngine, whose thread the session fixture starts and stops.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kiln.engine.arg_utils import EngineArgs
from kiln.engine.async_engine import AsyncEngine

MODEL = "kiln-test-model"


@pytest.fixture(scope="session")
def async_engine(default_gguf_path: Path) -> Iterator[AsyncEngine]:
    # as `kiln serve` does: the engine thread loads the model and runs every step
    ae = AsyncEngine.from_engine_args(EngineArgs(model=str(default_gguf_path), dtype="float32",
                                                 kv_cache_memory=256 << 20))
    yield ae
    ae.shutdown(timeout=5.0)


@dataclass
class Server:
    url: str
    engine: AsyncEngine

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def server(async_engine: AsyncEngine) -> Iterator[Server]:
    from kiln.entrypoints.openai.api_server import build_app

    with serve_in_thread(build_app(async_engine, MODEL)) as url:
        yield Server(url, async_engine)


@pytest.fixture()
def client(server: Server):
    from openai import OpenAI

    with OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def scrape(url: str) -> dict[str, float]:
    """GET /metrics → {'name{label="v"}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            values[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return values


def wait_idle(server: Server, timeout: float = 5.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and no KV block is held; return the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(server.url)
        idle = (m["kiln:num_requests_running"] == 0 and m["kiln:num_requests_waiting"] == 0
                and m["kiln:kv_cache_blocks_in_use"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


@pytest.fixture()
def metrics():
    """scrape(url) → parsed /metrics; wait_idle(server) → the scrape once the engine is idle."""
    return scrape, wait_idle


@pytest.fixture()
def serve_app():
    """serve_app(app) → a context manager yielding the base URL of a uvicorn server running `app`."""
    return serve_in_thread
