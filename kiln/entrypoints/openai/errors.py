"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, and the handlers
that turn every failure the server can meet into one.

Status codes: 400 bad input (wrong types, out-of-range values, malformed JSON: pydantic's 422
is folded into 400, as OpenAI itself answers), 401 bad API key, 404 unknown model or route,
503 queue full / engine unavailable (with Retry-After), 500 a failure inside kiln.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.engine.async_engine import EngineUnavailableError, QueueFullError

logger = logging.getLogger("kiln.server")

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_LEADING_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")


def bad_value(exc: ValueError, known_params: frozenset[str] = frozenset()) -> APIError:
    """A ValueError from SamplingParams / the engine / the chat template → 400, message unchanged.

    Their messages start with the offending field's name ("temperature must be ..."), which
    becomes `param` when it is one the API knows.
    """
    message = str(exc)
    match = _LEADING_NAME.match(message)
    param = match.group(1) if match and match.group(1) in known_params else None
    return APIError(400, message, param=param)


# pydantic's union members appear in error locations ("stop", "list[str]"); users want the field.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "-" in p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
            return APIError(400, f"request body is not valid JSON ({detail}); send a JSON object", code="invalid_json")
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    path = _field_path(loc) if loc and loc[0] == "body" else ".".join(map(str, loc))
    if not path:
        message = f"request body: {first.get('msg')}; send a JSON object with the API's fields"
    else:
        message = f"{path}: {first.get('msg')}"
        if "input" in first and not isinstance(first["input"], (dict, list)):
            message += f" (got {first['input']!r})"
    others = len({_field_path(tuple(e.get("loc", ()))) for e in errors[1:]} - {path})
    if others:
        message += f"; and {others} more invalid field(s)"
    return APIError(400, message, param=path or None, code="invalid_type" if path else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return bad_value(exc).response()

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return APIError(
            503, str(exc), "server_overloaded", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        ).response()

    @app.exception_handler(EngineUnavailableError)
    async def _unavailable(_: Request, exc: EngineUnavailableError) -> JSONResponse:
        return APIError(
            503, str(exc), "service_unavailable", code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        ).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error").response()
