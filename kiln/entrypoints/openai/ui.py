"""The browser face of `kiln serve` (kiln issue 22): a chat page, a live dashboard and the report.

    GET /                 the chat page (static/chat.html + chat.js + markdown.js + ui.css)
    GET /dashboard        live plots from the engine's own metrics (static/dashboard.html + .js)
    GET /report           the benchmark report, rendered by kiln.bench.report_html
    GET /ui/static/...    the pages' files, shipped in the package (no CDN, no build step)
    GET /ui/api/stats     the dashboard's feed: rates and percentiles over a 10 s window (ui_stats)
    GET /ui/api/config    the active configuration: what `kiln info` and the start-up lines say

The pages talk to the OpenAI API like any client; none of them needs anything the API does not
already give, except the two small /ui/api feeds. Pages and feeds stay open under --api-key (they
hold no secret: /metrics is open too); the chat page asks for the key once and sends it itself.
Every page is served with a Content-Security-Policy of 'self' only, so a page cannot load or send
anything off this server even if some output were ever injected as markup.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from kiln.engine.async_engine import AsyncEngine
from kiln.entrypoints.openai.ui_stats import StatsFeed
from kiln.errors import KilnError

STATIC_DIR = files("kiln.entrypoints.openai") / "static"
UI_PATHS = frozenset({"/", "/dashboard", "/report"})
UI_PREFIX = "/ui/"
# 'self' only: no CDN, no third-party request, no inline script or event handler attribute.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def is_ui_path(path: str) -> bool:
    """Paths the API-key middleware leaves open (pages and their files; the chat's API calls are not)."""
    return path in UI_PATHS or path.startswith(UI_PREFIX)


def _page(name: str) -> FileResponse:
    return FileResponse(str(STATIC_DIR / name), media_type="text/html", headers={"Content-Security-Policy": CSP})


def engine_config(async_engine: AsyncEngine, model_name: str) -> dict[str, Any]:
    """`kiln info` and the start-up lines as data. Reads attributes only: no torch op runs on the
    HTTP thread (AsyncEngine's threading contract); the kernel status is the library's cached state."""
    engine = async_engine.engine
    if engine is None or not async_engine.is_alive():
        return {"model": model_name, "loaded": False}
    from kiln.entrypoints.info import describe_config
    from kiln.kernels.native import native_status

    model = engine.loaded.model
    paths: dict[str, int] = {}
    for m in model.modules():
        if hasattr(m, "method"):
            paths[m.method.name] = paths.get(m.method.name, 0) + 1
    try:
        kernels = native_status() if model.device.type == "cpu" else f"torch on {model.device}"
    except KilnError as exc:  # a failed build is the engine's problem to report, not the page's
        kernels = f"unknown ({type(exc).__name__})"
    spec = engine.speculative_config
    return {
        "model": model_name, "loaded": True, "file_format": engine.loaded.file_format,
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "model_info": describe_config(engine.model_config),
        "tensor_types": dict(sorted(engine.loaded.tensor_types.items())),
        "linear_paths": paths, "kernels": kernels, "decode_step": model.decode_plan_status,
        "kv_cache": engine.kv_budget.describe(), "kv_cache_dtype": engine.cache_config.kv_cache_dtype,
        "block_size": engine.cache_config.block_size, "prefix_caching": engine.cache_config.enable_prefix_caching,
        "max_model_len": engine.max_model_len, "max_num_seqs": engine.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": engine.scheduler_config.max_num_batched_tokens,
        "speculative": None if spec is None else f"{spec.method}, k={spec.num_speculative_tokens}",
        "max_queue": async_engine.max_queue,
    }


def mount_ui(app: FastAPI, async_engine: AsyncEngine, model_name: str) -> None:
    """Add the pages, their static files and the two feeds to `app`."""
    feed = StatsFeed(async_engine.metrics)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return _page("chat.html")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> Response:
        return _page("dashboard.html")

    @app.get("/report", include_in_schema=False)
    async def report_page() -> Response:
        from kiln.bench.report_html import render_report_html

        # reads a few small JSON files: off the event loop so streams keep flowing meanwhile
        html = await asyncio.to_thread(render_report_html)
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP})

    @app.get("/ui/api/stats", include_in_schema=False)
    async def stats() -> Response:
        return JSONResponse(feed.payload(), headers={"Cache-Control": "no-store"})

    @app.get("/ui/api/config", include_in_schema=False)
    async def config() -> Response:
        return JSONResponse(engine_config(async_engine, model_name))

    app.mount("/ui/static", StaticFiles(directory=str(STATIC_DIR)), name="ui-static")
