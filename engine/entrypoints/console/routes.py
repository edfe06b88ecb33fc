"""The console's HTTP side: `GET /v1/cluster/status` (an API route) and the page's static files.

    GET /v1/cluster/status    the status document (status.py); authenticated like inference routes
    GET /                     static/index.html                      } public, served ahead of the
    GET /console/<file>       a file of static/ (nothing outside it) } API-key guard; 404 otherwise

The static files are served by `ConsoleFiles`, an ASGI middleware placed outside the guard: the
page must load without the key, since it is the page that asks for it. Everything else passes
through untouched. `--disable-console` leaves the middleware out, so `/` and `/console/*` reach
the guard and then the app, which knows no such routes (404 with the key).
"""
from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Awaitable, Callable, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.responses import FileResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ...engine_client import EngineClient
from ..openai.errors import APIError, to_api_error
from .status import ClusterStatus, standalone_status

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
STATUS_PATH = "/v1/cluster/status"
FILES_PREFIX = "/console/"

# NOTE: explicit types for what the page is made of: the platform's mime table varies (some map
# .js to text/plain, which browsers refuse to run as a module under nosniff).
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}

StatusSource = Callable[[], Awaitable[ClusterStatus]]


def add_status_route(app: FastAPI, engine_client: EngineClient, source: Optional[StatusSource] = None) -> None:
    """`GET /v1/cluster/status`; `source` builds the document (None: the standalone server's)."""

    async def build() -> ClusterStatus:
        return await standalone_status(engine_client)

    build_status = source if source is not None else build

    @app.get(STATUS_PATH)
    async def cluster_status() -> Response:
        try:
            document = await build_status()
        except Exception as error:  # noqa: BLE001 - mapped to a status, as the inference routes do
            return to_api_error(error).response()
        # no-store: a snapshot of live numbers, polled every second or two
        return JSONResponse(document.model_dump(), headers={"Cache-Control": "no-store"})


def static_file(url_path: str, root: Path = STATIC_DIR) -> Optional[Path]:
    """The file `url_path` (`/` or `/console/<file>`) names inside `root`, or None.

    Invariant: only regular files inside `root` are ever returned: `..`, absolute parts, and
    links that lead out of the folder resolve outside it and are refused.
    """
    if url_path == "/":
        relative = INDEX
    elif url_path.startswith(FILES_PREFIX):
        relative = url_path[len(FILES_PREFIX):]
    else:
        return None
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    try:
        base = root.resolve()
        candidate = (base / relative).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not candidate.is_relative_to(base) or not candidate.is_file():
        return None
    return candidate


def content_type(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


class ConsoleFiles:
    """Serves `/` and `/console/*` from the static folder ahead of the rest of the app (see above)."""

    def __init__(self, app: ASGIApp, root: Path = STATIC_DIR) -> None:
        self.app = app
        self.root = root

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != "/" and not path.startswith(FILES_PREFIX):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            error = APIError(405, f"{scope['method']} is not allowed on {path}; use GET", code="method_not_allowed",
                             headers={"Allow": "GET, HEAD"})
            await error.response()(scope, receive, send)
            return
        found = static_file(path, self.root)
        if found is None:
            await APIError(404, f"no console file at {path}", code="not_found").response()(scope, receive, send)
            return
        # no-cache: revalidated on every load (ETag), so an upgraded server never runs an old page
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        response = FileResponse(found, media_type=content_type(found), headers=headers)
        await response(scope, receive, send)
