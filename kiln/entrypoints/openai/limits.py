"""Per-request resource limits of `kiln serve`, each refused with one clear 4xx before any work starts.

- `n` (and `best_of`, which must equal it) at most `max_n`;
- at most `max_stop_strings` stop strings of at most `max_stop_chars` characters each (each one is
  matched against the tail of every sequence after every step);
- prompt + n × max_tokens at most `max_request_tokens` when set (and max_tokens, when omitted,
  defaults to the room the context and this budget leave);
- a request body of at most `max_body_bytes` (413, checked on the Content-Length header and on the
  bytes actually received, so a chunked upload cannot slip past);
- at most `max_streams_per_key` streaming responses open at once per API key (429 with
  Retry-After). kiln serve has one API key, so with --api-key this bounds that key's streams; without
  one, all clients share the anonymous key.

The prompt against the context length is checked where the prompt is tokenized (serving_common).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.entrypoints.openai.errors import RETRY_AFTER_SECONDS, APIError

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ServerLimits:
    """Limits a request must respect. Invariant: every field is positive, except the two that may be
    0 (max_request_tokens, max_streams_per_key), meaning no limit."""

    max_n: int = 16
    max_stop_strings: int = 16
    max_stop_chars: int = 512
    max_request_tokens: int = 0
    max_body_bytes: int = 2 << 20
    max_streams_per_key: int = 0

    def __post_init__(self) -> None:
        for name in ("max_n", "max_stop_strings", "max_stop_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        for name in ("max_request_tokens", "max_streams_per_key"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 (no limit) or more; got {getattr(self, name)}")


def check_n_and_stops(limits: ServerLimits, n: int, stop: str | list[str] | None) -> None:
    if n > limits.max_n:
        raise APIError(400, f"n is {n}; this server allows at most {limits.max_n} choices per request "
                            "(kiln serve --max-n)", param="n")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop_strings:
        raise APIError(400, f"stop has {len(stops)} strings; this server allows at most {limits.max_stop_strings} "
                            "(kiln serve --max-stop-strings)", param="stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_chars:
        raise APIError(400, f"a stop string is {longest} characters long; at most {limits.max_stop_chars} are allowed",
                       param="stop")


def request_token_room(limits: ServerLimits, prompt_len: int, n: int, field: str) -> int | None:
    """max_tokens per choice that the request budget leaves (None: no budget). A 400 when a prompt
    alone fills it."""
    if not limits.max_request_tokens:
        return None
    room = (limits.max_request_tokens - prompt_len) // max(n, 1)
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens and n is {n}; this server allows "
                            f"{limits.max_request_tokens} tokens per request (prompt + n x {field}), which leaves no "
                            "room to generate. Shorten the prompt or lower n.", param=field,
                       code="request_tokens_exceeded")
    return room


def check_request_tokens(limits: ServerLimits, prompt_len: int, n: int, max_tokens: int, field: str) -> None:
    if limits.max_request_tokens and prompt_len + n * max_tokens > limits.max_request_tokens:
        raise APIError(400, f"prompt ({prompt_len}) + n ({n}) x {field} ({max_tokens}) = {prompt_len + n * max_tokens} "
                            f"tokens; this server allows {limits.max_request_tokens} per request "
                            "(kiln serve --max-request-tokens). Lower max_tokens or n.", param=field,
                       code="request_tokens_exceeded")


def api_key_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The key a request counts against: a digest of its bearer token (never the token itself)."""
    token = dict(headers).get(b"authorization", b"")
    return hashlib.sha256(token).hexdigest()[:16] if token else ANONYMOUS


class StreamSlot:
    """One open stream's place; releasing twice is harmless (a stream ends through its generator's
    finally, its background task, or both)."""

    def __init__(self, owner: "StreamSlots", key: str) -> None:
        self._owner, self._key, self._released = owner, key, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self._key)


class StreamSlots:
    """Open streaming responses per API key. Invariant: a key's count equals its unreleased slots."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> StreamSlot:
        with self._lock:
            count = self._open.get(key, 0)
            if self.per_key and count >= self.per_key:
                raise APIError(429, f"this API key has {count} streams open, the most this server allows "
                                    f"(kiln serve --max-streams-per-key {self.per_key}); retry when one ends",
                               "rate_limit_error", code="too_many_streams",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            self._open[key] = count + 1
        return StreamSlot(self, key)

    def _release(self, key: str) -> None:
        with self._lock:
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)

    def open_streams(self, key: str | None = None) -> int:
        with self._lock:
            return sum(self._open.values()) if key is None else self._open.get(key, 0)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from the counting receive. An HTTPException, because FastAPI turns any other error
    while reading a body into a 400 "error parsing the body"; the app's handler renders it as 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is more than {max_bytes} bytes; this server accepts at most "
                              f"{max_bytes} bytes (kiln serve --max-body-bytes)")


class BodySizeLimitMiddleware:
    """413 for a request body over `max_bytes` (pure ASGI: streaming responses pass untouched)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self, size: str) -> APIError:
        return APIError(413, f"request body is {size}; this server accepts at most {self.max_bytes} bytes "
                             "(kiln serve --max-body-bytes)", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._error(f"{int(declared)} bytes").response()(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:  # the body is read before any endpoint answers, so this is the usual case
                await self._error(f"more than {self.max_bytes} bytes").response()(scope, receive, send)
