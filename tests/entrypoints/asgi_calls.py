"""Helpers of the in-process server tests: one HTTP request driven straight through an ASGI app, with
the client's side scripted (when its body arrives, when it disconnects), so that tests can leave or
stay at an exact point of a request's life without a socket.

(A uniquely named module, as server_helpers.py, so `from .asgi_calls import ...` never picks up
another folder's module.)
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class AsgiCall:
    """One request in flight: `leave()` disconnects the client; `result()` awaits the app's answer."""

    task: asyncio.Task
    left: asyncio.Event
    messages: list[dict[str, Any]] = field(default_factory=list)

    def leave(self) -> None:
        self.left.set()

    async def result(self, timeout_s: float = 30.0) -> "AsgiResponse":
        await asyncio.wait_for(self.task, timeout_s)
        return AsgiResponse(self.messages)


@dataclass
class AsgiResponse:
    messages: list[dict[str, Any]]

    @property
    def status(self) -> Optional[int]:
        """The status sent, or None when the app sent nothing."""
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """The server-sent events' payloads, '[DONE]' as a string."""
        lines = [line[len("data: "):] for line in self.body.decode().splitlines() if line.startswith("data: ")]
        return [line if line == "[DONE]" else json.loads(line) for line in lines]


def start_call(app: Any, path: str, payload: Optional[dict[str, Any]] = None, raw_body: Optional[bytes] = None,
               declared_length: Optional[int] = None) -> AsgiCall:
    """Starts POST `path` on `app`. The body (`payload` as JSON, or `raw_body`) arrives at once; with
    `declared_length` larger than it, the app keeps waiting for the rest. The client stays until
    `leave()`."""
    body = raw_body if raw_body is not None else json.dumps(payload).encode()
    length = declared_length if declared_length is not None else len(body)
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }
    left = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": length > len(body)}
        await left.wait()
        return {"type": "http.disconnect"}

    call = AsgiCall(task=None, left=left)     # type: ignore[arg-type]

    async def send(message: dict[str, Any]) -> None:
        call.messages.append(message)

    call.task = asyncio.ensure_future(app(scope, receive, send))
    return call


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    """Polls the (possibly async) predicate every 20 ms until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def server_errors(records: list[logging.LogRecord]) -> list[str]:
    """Log records at ERROR or above, or carrying a traceback: what a normal event must not produce."""
    return [record.getMessage() for record in records if record.levelno >= logging.ERROR or record.exc_info]
