"""The gRPC front (service `pagoda.v1.Pagoda`, see pagoda.proto) over any `EngineClient`.

Runs on the same event loop as the HTTP server and shares its `ServerLifecycle` (draining) and API
key. Status codes: INVALID_ARGUMENT for a bad request, NOT_FOUND for an unknown model,
UNAUTHENTICATED without the right `authorization: Bearer <key>` metadata, RESOURCE_EXHAUSTED when
the queue is full, UNAVAILABLE while shutting down or once the engine is dead. A message that does
not decode (e.g. a string field that is not UTF-8) is INVALID_ARGUMENT too, never UNKNOWN. When
the client cancels or its deadline passes, grpc.aio cancels the handler, which closes the engine
stream and so aborts the request.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from ...engine_client import EngineClient, resolve_model_name
from ...errors import EngineDeadError, EngineOverloadedError, EngineShuttingDownError, ModelNotFoundError
from ...outputs import RequestOutput
from ...generation_defaults import SAMPLING_FIELDS, GenerationDefaults
from ...sampling_params import SamplingParams
from ..auth import authorization_ok
from ..lifecycle import ServerLifecycle, cut_short, request_cut_error
from ..openai.protocol import MAX_LOGPROBS, MAX_N
from ..openai.request_to_params import generation_defaults_of
from ..settings import ServerSettings
from . import pagoda_pb2, pagoda_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = pagoda_pb2.DESCRIPTOR.services_by_name["Pagoda"]


@dataclass(frozen=True)
class UndecodableRequest:
    """What a handler receives in place of a request message that did not decode."""

    reason: str


def _tolerant(message_class: Any) -> Callable[[bytes], Any]:
    """`message_class.FromString`, but a bad message becomes an `UndecodableRequest` for the handler
    to refuse with INVALID_ARGUMENT (a deserializer that raises makes grpc answer UNKNOWN)."""

    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return UndecodableRequest(f"the request is not a valid {message_class.DESCRIPTOR.full_name}: {error}")

    return deserialize


def add_servicer(servicer: "PagodaServicer", server: grpc.aio.Server) -> None:
    """`pagoda_pb2_grpc.add_PagodaServicer_to_server`, every method with a tolerant request deserializer."""
    handlers = {}
    for method in SERVICE.methods:
        assert not method.client_streaming, f"{method.name}: client streaming is not served"
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(getattr(pagoda_pb2, method.input_type.name)),
            response_serializer=getattr(pagoda_pb2, method.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def to_sampling_params(options: pagoda_pb2.SamplingOptions,
                       defaults: GenerationDefaults = GenerationDefaults()) -> SamplingParams:
    """The request's options (ValueError, INVALID_ARGUMENT, for what the HTTP API refuses too); the
    sampling fields it leaves unset take the model's defaults, as over HTTP."""
    def get(name: str, default):  # unset optional fields keep the HTTP API's defaults
        return getattr(options, name) if options.HasField(name) else default

    for name, limit in (("n", MAX_N), ("logprobs", MAX_LOGPROBS)):
        if options.HasField(name) and getattr(options, name) > limit:
            raise ValueError(f"{name} must be at most {limit}, got {getattr(options, name)}")
    return SamplingParams(
        n=get("n", 1), max_tokens=get("max_tokens", 16),
        **defaults.merge({name: get(name, None) for name in SAMPLING_FIELDS}), seed=get("seed", None),
        stop=list(options.stop), stop_token_ids=list(options.stop_token_ids), ignore_eos=options.ignore_eos,
        min_tokens=options.min_tokens, presence_penalty=get("presence_penalty", 0.0),
        frequency_penalty=get("frequency_penalty", 0.0),
        logprobs=get("logprobs", None))


class PagodaServicer(pagoda_pb2_grpc.PagodaServicer):
    def __init__(self, client: EngineClient, settings: ServerSettings, lifecycle: ServerLifecycle) -> None:
        self.client = client
        self.settings = settings
        self.lifecycle = lifecycle

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if not authorization_ok(metadata.get("authorization"), self.settings.api_key):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key: send metadata 'authorization: Bearer <key>'")

    async def Generate(self, request: pagoda_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pagoda_pb2.GenerateResponse]:
        await self._authorize(context)
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if self.lifecycle.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(EngineShuttingDownError()))
        with self.lifecycle.call():
            try:
                resolve_model_name(self.client, request.model or None)
                prompt = self._prompt(request)
                params = to_sampling_params(request.sampling, generation_defaults_of(self.client))
                request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
                async for output in self.lifecycle.generate(self.client, prompt, params, request_id,
                                                            request.priority):
                    for message in _responses(output):
                        yield message
                    if cut_short(output):       # e.g. the drain ran out of time: UNAVAILABLE, never OK
                        raise request_cut_error()
            except Exception as error:  # noqa: BLE001 - mapped to a status code
                code, message = _status_of(error)
                await context.abort(code, message)

    @staticmethod
    def _prompt(request: pagoda_pb2.GenerateRequest):
        which = request.WhichOneof("prompt")
        if which == "text":
            return request.text
        if which == "token_ids":
            return {"prompt_token_ids": list(request.token_ids.ids)}
        raise ValueError("prompt must be set: text or token_ids")

    async def Health(self, request: pagoda_pb2.HealthRequest,
                     context: grpc.aio.ServicerContext) -> pagoda_pb2.HealthResponse:
        healthy = not self.lifecycle.draining and await self.client.is_healthy()
        return pagoda_pb2.HealthResponse(healthy=healthy)

    async def ListModels(self, request: pagoda_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pagoda_pb2.ListModelsResponse:
        await self._authorize(context)
        return pagoda_pb2.ListModelsResponse(models=[
            pagoda_pb2.Model(id=name, max_model_len=self.client.max_model_len) for name in self.client.model_names])


def _responses(output: RequestOutput) -> list[pagoda_pb2.GenerateResponse]:
    """One message per completion that has news (new tokens, text or its finish)."""
    messages = []
    for completion in output.outputs:
        if not (completion.delta_token_ids or completion.delta_text or completion.finish_reason):
            continue
        logprobs = [entry[token].logprob for token, entry in
                    zip(completion.delta_token_ids, completion.delta_logprobs or []) if token in entry]
        messages.append(pagoda_pb2.GenerateResponse(
            request_id=output.request_id, index=completion.index, token_ids=completion.delta_token_ids,
            text=completion.delta_text, logprobs=logprobs, finish_reason=completion.finish_reason or ""))
    if output.finished and messages:
        prompt_tokens = len(output.prompt_token_ids)
        completion_tokens = sum(len(c.token_ids) for c in output.outputs)
        messages[-1].usage.CopyFrom(pagoda_pb2.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens))
    return messages


def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, EngineOverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, (EngineShuttingDownError, EngineDeadError)):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    logger.error("internal error while serving a gRPC request", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal server error; the server log has the details"


async def start_grpc_server(client: EngineClient, settings: ServerSettings,
                            lifecycle: ServerLifecycle) -> tuple[grpc.aio.Server, int]:
    """Starts serving on settings.host:settings.grpc_port; returns the server and its bound port."""
    limit = settings.max_request_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 4 * 1024 * 1024))])
    add_servicer(PagodaServicer(client, settings, lifecycle), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    if port == 0:
        raise ValueError(f"could not bind the gRPC server to {settings.host}:{settings.grpc_port}")
    await server.start()
    return server, port
