"""The OpenAI-compatible HTTP server: `build_app(engine_client, settings)` and `run_server(...)`.

`build_app` knows the engine only through the `EngineClient` protocol and keeps all of its state on
the objects it creates (nothing at module level), so the cluster ingress builds the same app around a
client that forwards to Ray replicas, and tests build several apps in one process.

`run_server` serves the app with uvicorn (plus the gRPC server when `grpc_port` is set) and turns
SIGTERM/SIGINT into a graceful drain (see `lifecycle.py`); a second signal exits at once.
"""
from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
import signal
from types import FrameType
from typing import Any, Awaitable, Callable, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from ...engine_client import EngineClient, resolve_model_name
from ...metrics import CONTENT_TYPE
from ..lifecycle import ServerLifecycle
from ..settings import ServerSettings
from .errors import APIError, bad_request, install_error_handlers, parse_json_object, to_api_error
from .middleware import GuardMiddleware
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
                       TokenizeRequest)
from .serving_chat import ChatServer, chat_prompt_token_ids
from .serving_completions import CompletionServer

logger = logging.getLogger(__name__)


def pagoda_version() -> str:
    try:
        return importlib.metadata.version("pagoda")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _openai_errors(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Turns any exception of a route into its OpenAI error response (and logs real internal errors)."""

    @functools.wraps(route)
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            return await route(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - mapped to a status by to_api_error
            return to_api_error(error).response()

    return wrapper


async def _parse(raw_request: Request, model: type) -> Any:
    return model.model_validate(parse_json_object(await raw_request.body()))


def build_app(engine_client: EngineClient, settings: ServerSettings,
              lifecycle: Optional[ServerLifecycle] = None) -> FastAPI:
    lifecycle = lifecycle if lifecycle is not None else ServerLifecycle()
    completions = CompletionServer(engine_client, lifecycle)
    chat = ChatServer(engine_client, lifecycle)
    app = FastAPI(title="pagoda", version=pagoda_version())
    app.state.engine_client = engine_client
    app.state.lifecycle = lifecycle
    app.state.settings = settings
    install_error_handlers(app)

    @app.post("/v1/completions")
    @_openai_errors
    async def create_completion(raw_request: Request) -> Response:
        return await completions.create(await _parse(raw_request, CompletionRequest), raw_request)

    @app.post("/v1/chat/completions")
    @_openai_errors
    async def create_chat_completion(raw_request: Request) -> Response:
        return await chat.create(await _parse(raw_request, ChatCompletionRequest), raw_request)

    @app.get("/v1/models")
    @_openai_errors
    async def list_models() -> Response:
        cards = [ModelCard(id=name, max_model_len=engine_client.max_model_len) for name in engine_client.model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/health")
    @_openai_errors
    async def health() -> Response:
        if await engine_client.is_healthy():
            return Response(status_code=200)
        raise APIError(503, "the engine is not healthy", type="service_unavailable", code="engine_dead")

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": pagoda_version()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await engine_client.render_metrics(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    @_openai_errors
    async def tokenize(raw_request: Request) -> Response:
        request: TokenizeRequest = await _parse(raw_request, TokenizeRequest)
        resolve_model_name(engine_client, request.model)
        tokenizer = engine_client.tokenizer
        if tokenizer is None:
            raise bad_request("this server has no tokenizer")
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("pass exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            tokens = chat_prompt_token_ids(tokenizer, request.messages)
        else:
            tokens = list(tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
        return JSONResponse({"count": len(tokens), "max_model_len": engine_client.max_model_len, "tokens": tokens})

    @app.post("/detokenize")
    @_openai_errors
    async def detokenize(raw_request: Request) -> Response:
        request: DetokenizeRequest = await _parse(raw_request, DetokenizeRequest)
        resolve_model_name(engine_client, request.model)
        tokenizer = engine_client.tokenizer
        if tokenizer is None:
            raise bad_request("this server has no tokenizer")
        for token in request.tokens:
            if not 0 <= token < 2**31:
                raise bad_request(f"token id {token} is not a valid token id", param="tokens")
        return JSONResponse({"prompt": tokenizer.decode(request.tokens)})

    # NOTE: added last = outermost. CORS must see preflights and decorate 401/413/503s as well.
    app.add_middleware(GuardMiddleware, lifecycle=lifecycle, api_key=settings.api_key,
                       max_request_body_bytes=settings.max_request_body_bytes)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's Server whose first SIGTERM/SIGINT starts a drain instead of closing at once."""

    def __init__(self, config: uvicorn.Config, on_first_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_first_signal = on_first_signal
        self._drain_requested = False

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        # NOTE: the signal is not recorded in _captured_signals: uvicorn would re-raise it after
        # serving, and the process would die by the signal instead of exiting 0.
        if self._drain_requested:
            logger.warning("second %s: exiting now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        self._drain_requested = True
        logger.info("%s received: draining", signal.Signals(sig).name)
        self._on_first_signal()


async def run_server(engine_client: EngineClient, settings: ServerSettings) -> None:
    """Serves until a signal's drain completes (or a second signal arrives)."""
    lifecycle = ServerLifecycle()
    app = build_app(engine_client, settings, lifecycle)
    loop = asyncio.get_running_loop()
    grpc_server = None
    if settings.grpc_port is not None:
        from ..grpc.server import start_grpc_server

        grpc_server, bound = await start_grpc_server(engine_client, settings, lifecycle)
        logger.info("gRPC server listening on %s:%d", settings.host, bound)

    async def drain_then_exit() -> None:
        await lifecycle.drain(engine_client, settings.shutdown_timeout_s)
        server.should_exit = True

    def on_first_signal() -> None:
        loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit()))

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = DrainingServer(config, on_first_signal)
    try:
        await server.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=0.5)
