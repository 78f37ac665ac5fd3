"""The OpenAI-compatible HTTP server: `build_app` (FastAPI) and `run_server` (uvicorn + graceful stop).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}] (the base model and its
LoRA adapters), POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter, GET /health,
POST /tokenize, POST /detokenize, GET /metrics, GET /version; and unless `ui=False` (`--no-ui`) the
browser pages GET /, /dashboard, /report (kiln.entrypoints.openai.ui).

The HTTP layer never runs a forward pass: it validates, hands requests to the AsyncEngine's
thread and relays outputs. SIGTERM: uvicorn stops accepting connections and waits (up to the
shutdown timeout) for in-flight responses; then the engine is drained and stopped; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.engine.async_engine import AsyncEngine
from kiln.entrypoints.openai.errors import APIError, install_error_handlers
from kiln.entrypoints.openai.lora_routes import adapter_cards, mount_lora_routes
from kiln.entrypoints.openai.limits import BodySizeLimitMiddleware, ServerLimits
from kiln.entrypoints.openai.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
)
from kiln.entrypoints.openai.serving_chat import create_chat_completion, render_chat
from kiln.entrypoints.openai.tool_calls import parse_tools
from kiln.entrypoints.openai.serving_common import ServingContext
from kiln.entrypoints.openai.serving_completion import create_completion
from kiln.entrypoints.openai.ui import is_ui_path, mount_ui
from kiln.engine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

logger = logging.getLogger("kiln.server")

# Paths that stay open when an API key is set: liveness probes and Prometheus scrapers.
OPEN_PATHS = frozenset({"/health", "/metrics"})


class APIKeyMiddleware:
    """Pure ASGI (no response buffering, so streaming and disconnect detection are untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        # the UI pages are open (no secret in them); the chat page sends the key on its API calls
        if scope["type"] != "http" or path in OPEN_PATHS or is_ui_path(path) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(given, self.expected):
            message = "missing API key: send 'Authorization: Bearer <key>'" if not given else "incorrect API key"
            error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(
    async_engine: AsyncEngine, model_name: str, api_key: str | None = None, engine_shutdown_timeout: float = 5.0,
    limits: ServerLimits | None = None, ui: bool = True,
) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine thread and, at shutdown, drains and stops it
    (run it with lifespan="off" to share one AsyncEngine between several apps). `limits`: the
    per-request resource limits (ServerLimits' defaults when None). `ui`: serve the browser pages."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await asyncio.to_thread(async_engine.shutdown, engine_shutdown_timeout)

    app = FastAPI(title="kiln", summary="OpenAI-compatible API served by kiln", lifespan=lifespan)
    ctx = ServingContext(async_engine, model_name, limits)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=ctx.limits.max_body_bytes)
    if api_key:  # added last, so it runs first: an unauthenticated client cannot make the server read a body
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": ctx.created, "owned_by": "kiln",
                "max_model_len": async_engine.max_model_len}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(), *adapter_cards(ctx)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if ctx.check_model(model_id) is not None:
            return next(card for card in adapter_cards(ctx) if card["id"] == model_id)
        return model_card()

    mount_lora_routes(app, ctx)

    @app.get("/health")
    async def health() -> Response:
        if async_engine.is_alive():
            return JSONResponse({"status": "ok"})
        return APIError(503, "the engine loop is not running", "service_unavailable", code="engine_unavailable").response()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` (text) or `messages` (a chat)", param="prompt")
        if body.messages is not None:
            text = render_chat(ctx, body.messages, body.add_generation_prompt, tools=parse_tools(body.tools or []))
            ids = ctx.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = ctx.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": async_engine.max_model_len, "tokens": ids,
                "token_strs": ctx.tokenizer.convert_ids_to_tokens(ids)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        ctx.check_model(body.model)
        vocab = ctx.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": ctx.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(async_engine.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        from kiln import __version__

        return {"version": __version__}

    if ui:
        mount_ui(app, async_engine, model_name)
    return app


def run_server(
    async_engine: AsyncEngine,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    shutdown_timeout: float = 30.0,
    log_level: str = "info",
    limits: ServerLimits | None = None,
    ui: bool = True,
) -> None:
    """Serve until SIGINT/SIGTERM. In-flight requests get `shutdown_timeout` seconds to finish."""
    import uvicorn

    app = build_app(async_engine, model_name, api_key, limits=limits, ui=ui)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
        access_log=log_level == "debug",
    )
    server = uvicorn.Server(config)
    in_main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises the signal it caught once it has shut down gracefully; with the default
    # SIGTERM action that would kill the process with status -15. A no-op handler turns that
    # re-raise into a clean return (exit 0), which is what process managers expect.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if in_main else None
    try:
        server.run()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
