"""The gate every HTTP request passes before a route: draining, API key, body size, in-flight count.

A plain ASGI middleware (not FastAPI's `@app.middleware`, which buffers streaming bodies):

    /metrics                         always open
    draining (SIGTERM received)      503 + Retry-After for everything else, /health included
    /health, /version, docs          open
    anything else (/v1/*, /tokenize, /detokenize, unknown routes)
                                     401 unless `Authorization: Bearer <api key>` (when a key is set);
                                     413 when the body is over the limit (Content-Length, or counted
                                     as it streams in); counted as in flight until its last byte
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import authorization_ok
from ..lifecycle import ServerLifecycle
from .errors import APIError

OPEN_PATHS = frozenset({"/health", "/version", "/docs", "/openapi.json", "/redoc"})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, lifecycle: ServerLifecycle, api_key: Optional[str],
                 max_request_body_bytes: int) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.api_key = api_key
        self.max_request_body_bytes = max_request_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            error = APIError(503, "the server is shutting down and accepts no new requests",
                             type="service_unavailable", code="shutting_down", headers={"Retry-After": "5"})
            await error.response()(scope, receive, send)
            return
        if scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if scope["method"] != "OPTIONS" and not authorization_ok(headers.get("authorization"), self.api_key):
            error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             type="authentication_error", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await APIError(400, f"Content-Length must be a number of bytes, got {declared!r}").response()(
                    scope, receive, send)
                return
            if int(declared) > self.max_request_body_bytes:
                await self._too_large(int(declared)).response()(scope, receive, send)
                return
        with self.lifecycle.call():
            await self.app(scope, self._limited(receive), send)

    def _too_large(self, num_bytes: int) -> APIError:
        return APIError(413, f"the request body has {num_bytes} bytes or more, over the limit of "
                             f"{self.max_request_body_bytes} bytes", code="request_too_large")

    def _limited(self, receive: Receive) -> Callable[[], Any]:
        """`receive`, raising 413 (an APIError the routes turn into a response) past the limit."""
        num_received = 0

        async def limited_receive() -> Message:
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_request_body_bytes:
                    raise self._too_large(num_received)
            return message

        return limited_receive


def _headers(scope: Scope) -> dict[str, str]:
    out = {}
    for name, value in scope.get("headers", []):
        with contextlib.suppress(UnicodeDecodeError):
            out[name.decode("latin-1").lower()] = value.decode("latin-1")
    return out
