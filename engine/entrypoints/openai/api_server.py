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
from starlette.requests import ClientDisconnect

from ...engine_client import EngineClient, resolve_model_name
from ...metrics import CONTENT_TYPE
from ...processing.tokenizer import TokenizerThread, check_text_fits, encode_text, prompt_chars_limit
from ...utils import startup_timeline
from ..console.routes import ConsoleFiles, StatusSource, add_status_route
from ..lifecycle import ServerLifecycle
from ..settings import ServerSettings
from .errors import APIError, bad_request, install_error_handlers, to_api_error
from .middleware import GuardMiddleware
from .chat_messages import ChatCompletionRequest, TokenizeRequest
from .protocol import CompletionRequest, DetokenizeRequest, ModelCard, ModelList
from .request_body import parse_json_object
from .serving_chat import ChatServer, chat_prompt_token_ids
from .serving_completions import CompletionServer
from .streaming import CLIENT_CLOSED_REQUEST

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
        except ClientDisconnect:
            # NOTE: the client left while its body was arriving: normal, not an internal error.
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as error:  # noqa: BLE001 - mapped to a status by to_api_error
            return to_api_error(error).response()

    return wrapper


async def _parse(raw_request: Request, model: type) -> Any:
    body = await raw_request.body()
    return model.model_validate(parse_json_object(body, raw_request.headers.get("content-type")))


def _decode(tokenizer: Any, token_ids: list[int]) -> str:
    """The text of `token_ids`; ValueError names an id outside the tokenizer's vocabulary."""
    vocab = len(tokenizer)
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab):
        bad = next(token for token in token_ids if not 0 <= token < vocab)
        raise ValueError(f"tokens: token id {bad} is outside the vocabulary [0, {vocab})")
    return tokenizer.decode(token_ids)


def build_app(engine_client: EngineClient, settings: ServerSettings,
              lifecycle: Optional[ServerLifecycle] = None, cluster_status: Optional[StatusSource] = None) -> FastAPI:
    """The OpenAI app, plus the console (`GET /v1/cluster/status`; the page at `/` unless
    `settings.disable_console`). cluster_status: builds the status document (the Ray ingress passes
    its own); None = the standalone server's, from `engine_client`."""
    lifecycle = lifecycle if lifecycle is not None else ServerLifecycle()
    # chat templates, /tokenize and /detokenize of long inputs run here, off the event loop
    tokenizer_thread = TokenizerThread("pagoda-http-tokenizer")
    completions = CompletionServer(engine_client, lifecycle)
    chat = ChatServer(engine_client, lifecycle, tokenizer_thread, settings)
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
        request: ChatCompletionRequest = await _parse(raw_request, ChatCompletionRequest)
        if request.chat_template is not None and not settings.trust_request_chat_template:
            # NOTE: a template is code the server runs (sandboxed Jinja, yet unbounded in time and
            # output), so a request may bring its own only where the operator allows it, as in vLLM.
            raise bad_request("chat_template in a request is refused by this server (it was started without "
                              "--trust-request-chat-template)", param="chat_template")
        return await chat.create(request, raw_request)

    @app.get("/v1/models")
    @_openai_errors
    async def list_models() -> Response:
        cards = [ModelCard(id=name, max_model_len=engine_client.max_model_len, **_model_format(engine_client))
                 for name in engine_client.model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    # NOTE: `:path`, as served names may hold slashes ("org/model"), which the SDK puts in the path as is.
    @app.get("/v1/models/{model:path}")
    @_openai_errors
    async def retrieve_model(model: str) -> Response:
        if model not in engine_client.model_names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {engine_client.model_names}",
                           param="model", code="model_not_found")
        return JSONResponse(ModelCard(id=model, max_model_len=engine_client.max_model_len,
                                      **_model_format(engine_client)).model_dump())

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
        # NOTE: text that cannot fit max_model_len is refused here too: its tokens would be of no use,
        # and tokenizing and sending back millions of them would hold up every other request.
        max_model_len = engine_client.max_model_len
        if request.messages is not None:
            tokens = await chat_prompt_token_ids(tokenizer, request.messages, tokenizer_thread, max_model_len)
        else:
            check_text_fits("prompt", len(request.prompt), prompt_chars_limit(tokenizer, max_model_len), max_model_len)
            tokens = await tokenizer_thread.run(encode_text, tokenizer, request.prompt, request.add_special_tokens,
                                                size=len(request.prompt))
        return JSONResponse({"count": len(tokens), "max_model_len": engine_client.max_model_len, "tokens": tokens})

    @app.post("/detokenize")
    @_openai_errors
    async def detokenize(raw_request: Request) -> Response:
        request: DetokenizeRequest = await _parse(raw_request, DetokenizeRequest)
        resolve_model_name(engine_client, request.model)
        tokenizer = engine_client.tokenizer
        if tokenizer is None:
            raise bad_request("this server has no tokenizer")
        # NOTE: decoding holds the GIL (unlike encoding), so even on the tokenizer thread millions of
        # ids would stall the event loop for seconds; no sequence of this model is longer than this.
        max_model_len = engine_client.max_model_len
        if len(request.tokens) > max_model_len:
            raise bad_request(f"tokens: {len(request.tokens)} token ids, more than max_model_len={max_model_len} "
                              "(the longest sequence this model holds)", param="tokens")
        try:
            text = await tokenizer_thread.run(_decode, tokenizer, request.tokens, size=len(request.tokens))
        except ValueError as error:
            raise bad_request(str(error), param="tokens") from None
        return JSONResponse({"prompt": text})

    add_status_route(app, engine_client, cluster_status)

    # NOTE: added last = outermost. CORS must see preflights and decorate 401/413/503s as well.
    app.add_middleware(GuardMiddleware, lifecycle=lifecycle, api_key=settings.api_key,
                       max_request_body_bytes=settings.max_request_body_bytes)
    if not settings.disable_console:
        # outside the guard: the page is public (it asks for the key itself); see console/routes.py
        app.add_middleware(ConsoleFiles)
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

    async def startup(self, sockets: Optional[list] = None) -> None:
        await super().startup(sockets)
        if self.started:           # listening, and the engine was built before: /health can answer
            startup_timeline.mark("HTTP bind")
            startup_timeline.ready()


async def run_server(engine_client: EngineClient, settings: ServerSettings) -> None:
    """Serves until a signal's drain completes (or a second signal arrives)."""
    lifecycle = ServerLifecycle()
    app = build_app(engine_client, settings, lifecycle)
    startup_timeline.mark("HTTP app")
    loop = asyncio.get_running_loop()
    grpc_server = None
    if settings.grpc_port is not None:
        from ..grpc.server import start_grpc_server

        grpc_server, bound = await start_grpc_server(engine_client, settings, lifecycle)
        logger.info("gRPC server listening on %s:%d", settings.host, bound)

    async def drain_then_exit() -> None:
        try:
            await lifecycle.drain(engine_client, settings.shutdown_timeout_s)
        finally:
            server.should_exit = True          # whatever happened to the drain, the server exits

    drain_tasks: list[asyncio.Task] = []       # NOTE: the loop keeps only a weak reference to a task

    def on_first_signal() -> None:
        loop.call_soon_threadsafe(lambda: drain_tasks.append(loop.create_task(drain_then_exit())))

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = DrainingServer(config, on_first_signal)
    try:
        await server.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=0.5)


def _model_format(engine_client: EngineClient) -> dict[str, Optional[str]]:
    """The card's quantization / weights / kv_cache_dtype; NOTE: an engine client written before
    `model_format` existed has none, and its cards simply leave them out."""
    return dict(getattr(engine_client, "model_format", None) or {})
