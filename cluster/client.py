"""The ingress's engine client: the `EngineClient` the OpenAI app needs, over Ray Serve replicas.

    HTTP ─> GuardMiddleware (auth, size) ─> RequestScopeMiddleware ─> build_app's routes
                                              peeks the body: model, stream;   │ client.generate(...)
                                              header x-session-id;             ▼
                                              makes sure the model's       ClusterEngineClient
                                              tokenizer is here            ├ tokenize, hash leading blocks
                                                                           ├ handle(model).generate ─> router ─> replica
                                                                           └ retry once on another replica

`build_app` is reused unchanged. Its `EngineClient` protocol has no model argument on `generate` and
one `tokenizer`, so the request's model travels in a context variable (`RequestScope`) that the
middleware sets before the route runs; `tokenizer` and `max_model_len` answer for that model.

Tokens travel over the ingress's token channel (`channels.py`: replicas put every ready output into
this ingress's mailbox actor, one call per batch), not over each request's own stream; the request's
own call is still what routes, counts, cancels and fails it (`token_channels=False`: per-request
streams, as before).

Retries: a request whose replica fails (actor died, engine dead, replica shutting down, or the replica
cut it short: finish_reason 'abort' that this ingress did not ask for) is sent once more, to
another replica, when the client has seen nothing yet: no output streamed, or any
non-streamed request (its response is only written at the end). A streamed request that already
sent tokens raises instead, and the server ends the stream with an error event.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.engine.engine_client import resolve_model_name
from pagoda.engine.entrypoints.console.status import (ClusterStatus, ModelStatus, ReplicaCounts, ReplicaStatus,
                                                      replica_status, unknown_replica)
from pagoda.engine.entrypoints.lifecycle import cut_short, request_cut_error
from pagoda.engine.entrypoints.openai.errors import APIError, to_api_error
from pagoda.engine.entrypoints.openai.request_body import parse_json_object
from pagoda.engine.errors import EngineDeadError, EngineOverloadedError, EngineShuttingDownError
from pagoda.engine.generation_defaults import GenerationDefaults
from pagoda.engine.outputs import EngineStats, RequestOutput, merge_outputs
from pagoda.engine.processing.input_processor import PromptType
from pagoda.engine.processing.tokenizer import TokenizerThread, prompt_chars_limit
from pagoda.engine.sampling_params import SamplingParams

from .channels import Inbox, TokenChannels, ray_mailbox
from .config import ModelDeployment
from .metrics import merge_expositions
from .routing_policy import prompt_block_hashes, router_for
from .wire import LeaseEnd, ModelInfo, OutputDecoder, ReplicaReport, ReplicaRequest, RoutingHints, WireOutput

logger = logging.getLogger(__name__)

SESSION_HEADER = b"x-session-id"
# A request is tried on at most this many replicas.
MAX_ATTEMPTS = 2
# How long a finished request waits for channel batches still owed to it before it ends with an error
# (they are sent before its LeaseEnd, so only a dead mailbox makes them late).
CHANNEL_CATCH_UP_S = 30.0
# A replica whose latest report is older than this is listed "unhealthy" without numbers in the
# console's status: Serve's controller asks every replica for one every few seconds
# (routing_stats_period_s), so a report this old means the replica stopped answering.
STALE_REPORT_S = 30.0
# How long the console's status waits for Serve's view of the deployments before going without it.
SERVE_VIEW_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DeploymentView:
    """What Serve's controller says of one model deployment (for the console's replica counts)."""

    target: int                                                   # the replicas Serve is scaling to
    replica_states: dict[str, str] = field(default_factory=dict)  # replica id -> STARTING, RUNNING, STOPPING...


# deployment name -> its view; the ingress's reads Serve's controller (ingress.ServeView)
ServeViewSource = Callable[[], Awaitable[dict[str, DeploymentView]]]


@dataclass(frozen=True)
class RequestScope:
    """What the middleware learned about the HTTP request that the route is serving."""

    model: Optional[str] = None          # the body's "model" (None = the default model)
    stream: bool = True                  # unknown (no JSON body) counts as streamed: no retry after output
    session_id: Optional[str] = None


_SCOPE: contextvars.ContextVar[RequestScope] = contextvars.ContextVar("pagoda_request_scope",
                                                                        default=RequestScope())


class ModelRoute:
    """One served model: its deployment handle and, once a replica has answered, its `ModelInfo`."""

    def __init__(self, deployment: ModelDeployment, deployment_name: str, handle: Any) -> None:
        self.deployment = deployment
        self.name = deployment.name
        self.deployment_name = deployment_name
        self.handle = handle
        self.info: Optional[ModelInfo] = None
        self._lock = asyncio.Lock()

    async def ready(self) -> ModelInfo:
        """Fetches the tokenizer and limits from a replica once (scales a model up from zero)."""
        if self.info is None:
            async with self._lock:
                if self.info is None:
                    self.info = await self.handle.describe.remote()
        return self.info


class ClusterEngineClient:
    """Implements `EngineClient` by forwarding to the replicas of each model's deployment."""

    def __init__(self, routes: list[ModelRoute], app_name: str, token_channels: bool = True,
                 mailbox_factory: Callable[[], Any] = ray_mailbox, serve_view: Optional[ServeViewSource] = None,
                 stale_report_s: float = STALE_REPORT_S, clock: Callable[[], float] = time.time) -> None:
        """token_channels: outputs come through this ingress's mailbox (else over each request's
        own stream); mailbox_factory makes the mailbox actor (tests pass an in-process one);
        serve_view: Serve's targets and replica states for `cluster_status` (None: the reports
        alone); clock: wall time, compared with the replicas' `reported_at`."""
        if not routes:
            raise ValueError("the cluster client needs at least one model")
        self.routes = {route.name: route for route in routes}
        self.app_name = app_name
        self._aborted: set[str] = set()
        self._streams: dict[str, Any] = {}
        self._token_channels = TokenChannels(mailbox_factory) if token_channels else None
        # tokenizes long prompts for their routing key, off the event loop
        self._tokenizer_thread = TokenizerThread("pagoda-ingress-tokenizer")
        self.serve_view = serve_view
        self.stale_report_s = stale_report_s
        self._clock = clock

    # -- the EngineClient protocol ------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.routes)

    @property
    def tokenizer(self) -> Any:
        info = self._route(_SCOPE.get().model).info
        return info.tokenizer if info is not None else None

    @property
    def max_model_len(self) -> int:
        return self._max_model_len(self._route(_SCOPE.get().model))

    @property
    def model_format(self) -> dict[str, Optional[str]]:
        info = self._route(_SCOPE.get().model).info
        return dict(info.model_format) if info is not None else {}

    @property
    def generation_defaults(self) -> GenerationDefaults:
        info = self._route(_SCOPE.get().model).info
        return info.generation_defaults if info is not None else GenerationDefaults()

    async def open_channel(self) -> None:
        """Starts the token channel's mailbox now (Ray starts a process for it, seconds), so that
        the first requests need not wait for it."""
        if self._token_channels is not None:
            self._token_channels.ref()

    async def prepare(self, model: Optional[str]) -> None:
        """Makes sure `tokenizer` can answer for `model` (unknown names are left to the route's 404)."""
        if not model or model in self.routes:
            await self._route(model).ready()

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        scope = _SCOPE.get()
        route = self._route(resolve_model_name(self, scope.model))
        try:
            info = await route.ready()
        except Exception as error:  # noqa: BLE001 - no replica could describe the model
            raise _client_error(_cause(error), during_request=False) from None
        hints = RoutingHints(request_id=request_id, prefix_hashes=await self._prefix_hashes(info, prompt),
                             session_id=scope.session_id)
        channels = self._token_channels
        for attempt in range(MAX_ATTEMPTS):
            # NOTE: a retry gets its own engine request id, so that it can never meet the first attempt's
            # leftovers (the same replica may still hold them); outputs carry the client's id again.
            engine_request_id = request_id if attempt == 0 else f"{request_id}.retry{attempt}"
            call = ReplicaRequest(prompt, params, engine_request_id, priority,
                                  dataclasses.replace(hints, attempt=attempt),
                                  channel=channels.ref() if channels is not None else None)
            decoder = OutputDecoder()
            last: Optional[RequestOutput] = None
            inbox = channels.open_inbox(engine_request_id) if channels is not None else None
            stream = route.handle.options(stream=True).generate.remote(call)
            self._streams[request_id] = stream
            lease = _watch(asyncio.ensure_future(_lease_end(stream))) if inbox is not None else None
            ended = False         # the replica's stream finished or failed: nothing left to cancel
            try:
                batches = (_channel_batches(lease, inbox) if lease is not None and inbox is not None
                           else _stream_batches(stream))
                async for batch in batches:
                    # what arrived together goes out as one output (fewer SSE events when behind)
                    merged: Optional[RequestOutput] = None
                    for wire in batch:
                        output = decoder.decode(wire)
                        merged = output if merged is None else merge_outputs(merged, output)
                    if merged is None:
                        continue
                    if cut_short(merged) and request_id not in self._aborted:
                        # NOTE: only the replica's own shutdown aborts a request whose caller still
                        # reads: a replica failure like the others, retried when the client has seen
                        # nothing yet, never passed on as a finished request
                        raise EngineShuttingDownError("the replica serving this request shut down before it finished")
                    if attempt:
                        merged.request_id = request_id
                    last = merged
                    yield last
                ended = True
                return
            except Exception as raised:  # noqa: BLE001 - sorted below
                ended = True
                error = _cause(raised)
                if request_id in self._aborted:       # abort() cancelled the stream
                    if last is None:
                        raise request_cut_error() from None
                    yield _aborted_output(last)
                    return
                if _is_replica_failure(error) and attempt + 1 < MAX_ATTEMPTS and (last is None or not scope.stream):
                    logger.warning("request %s: its replica failed (%s); retrying on another replica", request_id,
                                   type(error).__name__)
                    continue
                raise _client_error(error, during_request=last is not None) from None
            finally:
                self._streams.pop(request_id, None)
                self._aborted.discard(request_id)
                if channels is not None:
                    channels.close_inbox(engine_request_id)
                if lease is not None and not lease.done():
                    lease.cancel()
                if not ended:        # the consumer left early (client gone): abort on the replica
                    _cancel(stream)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._aborted.add(request_id)
            _cancel(stream)

    async def get_stats(self) -> EngineStats:
        """Every replica's counters added up (KV usage: used blocks over all blocks)."""
        total = EngineStats()
        used_blocks = 0
        for report in self.reports():
            stats = report.stats
            for name in ("num_running", "num_waiting", "num_blocks", "num_free_blocks", "prefix_cache_queries",
                         "prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens", "num_steps",
                         "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            per_position = stats.spec_decode_num_accepted_tokens_per_pos
            if len(per_position) > len(total.spec_decode_num_accepted_tokens_per_pos):
                total.spec_decode_num_accepted_tokens_per_pos += \
                    [0] * (len(per_position) - len(total.spec_decode_num_accepted_tokens_per_pos))
            for position, count in enumerate(per_position):
                total.spec_decode_num_accepted_tokens_per_pos[position] += count
            used_blocks += round(stats.kv_cache_usage * stats.num_blocks)
        total.kv_cache_usage = used_blocks / total.num_blocks if total.num_blocks else 0.0
        return total

    async def is_healthy(self) -> bool:
        """False when some model's replicas have all reported unhealthy (none known counts as healthy:
        a model may be scaled to zero, and Serve itself replaces dead replicas)."""
        for route in self.routes.values():
            reports = self.reports(route.name)
            if reports and not any(report.healthy for report in reports):
                return False
        return True

    async def render_metrics(self) -> bytes:
        """Every replica's `pagoda:` metrics, each series labelled with its `replica`."""
        return merge_expositions([({"replica": report.replica_id}, report.metrics) for report in self.reports()])

    # -- cluster views -----------------------------------------------------------------------------
    def reports(self, model: Optional[str] = None) -> list[ReplicaReport]:
        """The latest report of each running replica (of one model, or of all)."""
        routes = [self.routes[model]] if model is not None else list(self.routes.values())
        reports = []
        for route in routes:
            router = router_for(self.app_name, route.deployment_name)
            if router is not None:
                reports.extend(router.reports())
        return reports

    def status(self) -> list[dict[str, Any]]:
        """One row per replica, for `pagoda status` (plain values: it crosses Ray)."""
        rows = []
        for route in self.routes.values():
            for report in sorted(self.reports(route.name), key=lambda r: r.replica_id):
                stats = report.stats
                rows.append({
                    "model": route.name, "deployment": route.deployment_name, "replica": report.replica_id,
                    "healthy": report.healthy, "waiting": stats.num_waiting, "running": stats.num_running,
                    "kv_cache_usage": stats.kv_cache_usage, "prefix_cache_hit_rate": report.prefix_cache_hit_rate,
                    "prefix_cache_queries": stats.prefix_cache_queries, "prefix_cache_hits": stats.prefix_cache_hits,
                    "prompt_tokens": stats.prompt_tokens, "generation_tokens": stats.generation_tokens,
                    "num_steps": stats.num_steps, "reported_at": report.reported_at,
                    # speculative decoding: drafts verified and accepted (0 when it is off)
                    "spec_draft_tokens": stats.spec_decode_num_draft_tokens,
                    "spec_accepted_tokens": stats.spec_decode_num_accepted_tokens,
                })
        return rows

    async def cluster_status(self) -> ClusterStatus:
        """The console's status document: per model, Serve's replica counts and every replica's entry.

        Entries come from the replicas' latest reports (no call to any replica: a slow or dead one
        cannot hold the document up). A report older than `stale_report_s` gives an "unhealthy"
        entry without numbers; a replica Serve lists but that has not reported yet, a "starting"
        one; one Serve is stopping, "draining". Without Serve's view (`serve_view` None, failed or
        late) the counts come from the reports: current = target = the replicas that reported.
        """
        views: dict[str, DeploymentView] = {}
        if self.serve_view is not None:
            try:
                views = await asyncio.wait_for(self.serve_view(), SERVE_VIEW_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - the reports alone still make a document
                logger.info("Serve's deployment view is unavailable (%s); replica counts from reports",
                            type(error).__name__)
        now = self._clock()
        models = [self._model_status(route, views.get(route.deployment_name), now) for route in self.routes.values()]
        return ClusterStatus(mode="ray", time=now, models=models)

    def _model_status(self, route: ModelRoute, view: Optional[DeploymentView], now: float) -> ModelStatus:
        reports = {report.replica_id: report for report in self.reports(route.name)}
        serve_states = view.replica_states if view is not None else {}
        entries = [self._replica_entry(replica_id, reports.get(replica_id), serve_states.get(replica_id), now)
                   for replica_id in sorted(set(reports) | set(serve_states))]
        if view is not None:
            current = sum(1 for state in serve_states.values() if state == "RUNNING")
            target = view.target
        else:
            current = target = len(reports)
        deployment = route.deployment
        low = deployment.num_replicas if not deployment.autoscaling else deployment.min_replicas
        counts = ReplicaCounts(current=current, target=target, min=low, max=deployment.most_replicas)
        return ModelStatus(name=route.name, max_model_len=self._max_model_len(route), replicas=counts,
                           replica_stats=entries)

    def _replica_entry(self, replica_id: str, report: Optional[ReplicaReport], serve_state: Optional[str],
                       now: float) -> ReplicaStatus:
        if report is None:
            # listed by Serve, no report yet: starting (or stopping before it ever reported)
            return unknown_replica(replica_id, "draining" if serve_state == "STOPPING" else "starting")
        if now - report.reported_at > self.stale_report_s:
            return unknown_replica(replica_id, "unhealthy")
        if report.console is not None:
            entry = ReplicaStatus.model_validate(report.console)
        else:      # a replica that sends no console entry: its counters, no latencies
            entry = replica_status(replica_id, "running", report.stats, None)
        entry.replica = replica_id
        if not report.healthy:
            entry.state = "unhealthy"
        elif serve_state == "STOPPING":
            entry.state = "draining"
        return entry

    @staticmethod
    def _max_model_len(route: ModelRoute) -> int:
        if route.info is not None:
            return route.info.max_model_len
        return int(route.deployment.engine_args.get("max_model_len") or 0)

    def _route(self, model: Optional[str]) -> ModelRoute:
        if model and model in self.routes:
            return self.routes[model]
        return next(iter(self.routes.values()))

    async def _prefix_hashes(self, info: ModelInfo, prompt: PromptType) -> list[int]:
        """The routing key; an unusable prompt gets none (the replica reports what is wrong with it).

        A prompt that cannot fit max_model_len is not tokenized at all (the replica refuses it at
        once); a long one is tokenized on the tokenizer thread, so the ingress's loop keeps serving.
        """
        if not info.enable_prefix_caching:
            return []
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        try:
            if isinstance(prompt, str):
                limit = prompt_chars_limit(info.tokenizer, info.max_model_len)
                if info.tokenizer is None or (limit is not None and len(prompt) > limit):
                    return []
                token_ids = await self._tokenizer_thread.run(info.tokenizer.encode, prompt, size=len(prompt))
            elif isinstance(prompt, (list, tuple)) and len(prompt) < info.max_model_len:
                token_ids = [int(token) for token in prompt]
            else:
                return []
            return prompt_block_hashes(list(token_ids), info.block_size)
        except Exception:  # noqa: BLE001
            return []


async def _stream_batches(stream: Any) -> AsyncIterator[list[WireOutput]]:
    """The outputs as the request's own call streams them."""
    async for batch in stream:
        yield batch


async def _channel_batches(lease: asyncio.Future, inbox: Inbox) -> AsyncIterator[list[WireOutput]]:
    """The outputs of a channel-mode request: its batches from the token channel, in order, then the
    final ones from its lease's `LeaseEnd`. The lease's failure is the request's failure."""
    ended_at: Optional[float] = None
    while True:
        inbox.changed.clear()
        ready = inbox.take_ready()
        if ready:
            yield [wire for batch in ready for wire in batch]
        if lease.done():
            end = lease.result()                       # raises the request's failure
            if inbox.next_seq >= end.num_batches:
                yield end.final
                return
            # the channel still owes batches (the replica sent them before its LeaseEnd; they are
            # on their way through the mailbox) unless the mailbox died
            now = asyncio.get_running_loop().time()
            ended_at = ended_at if ended_at is not None else now
            if now - ended_at > CHANNEL_CATCH_UP_S:
                raise EngineDeadError(f"the token channel from replica {end.replica_id} lost outputs",
                                      during_request=True)
        waiter = asyncio.ensure_future(inbox.changed.wait())
        try:
            await asyncio.wait({waiter, lease}, timeout=0.2 if lease.done() else None,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()


def _watch(task: asyncio.Future) -> asyncio.Future:
    """Marks the task's exception as retrieved (the request reads it, or has gone away)."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def _lease_end(stream: Any) -> LeaseEnd:
    async for item in stream:
        if isinstance(item, LeaseEnd):
            return item
        raise TypeError(f"a channel-mode request's call yielded {type(item).__name__}, not LeaseEnd")
    raise EngineDeadError("the replica ended the request without its final outputs", during_request=True)


def _cancel(stream: Any) -> None:
    """Best-effort cancel of a handle call (Serve cancels the replica's generator: the engine aborts).

    NOTE: `cancel()` re-raises the call's own failure when it has one; it has been handled already.
    """
    try:
        stream.cancel()
    except Exception:  # noqa: BLE001
        pass


def _cause(error: BaseException) -> BaseException:
    """The replica's own exception inside Ray's wrapper (its message carries no Ray traceback)."""
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def _is_replica_failure(error: BaseException) -> bool:
    return isinstance(error, (RayActorError, ReplicaUnavailableError, EngineDeadError, EngineShuttingDownError))


def _client_error(error: BaseException, during_request: bool) -> BaseException:
    """The engine-client error a failure maps to (build_app turns those into statuses)."""
    if isinstance(error, BackPressureError):
        return EngineOverloadedError(error.args[0] if error.args else 0, error.args[1] if len(error.args) > 1 else 0,
                                     retry_after_s=1)
    if isinstance(error, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, TaskCancelledError)):
        return EngineDeadError("the model replica serving this request failed; retry the request",
                               during_request=during_request)
    if isinstance(error, EngineDeadError):
        return EngineDeadError(str(error), during_request=during_request)
    return error


def _aborted_output(last: RequestOutput) -> RequestOutput:
    outputs = [dataclasses.replace(c, finish_reason=c.finish_reason or "abort", delta_text="", delta_token_ids=[],
                                   delta_logprobs=[] if c.delta_logprobs is not None else None)
               for c in last.outputs]
    return dataclasses.replace(last, outputs=outputs, finished=True)


# -- the middleware --------------------------------------------------------------------------------
class RequestScopeMiddleware:
    """Sets `RequestScope` for the route, after reading (and replaying) a POST body.

    Runs inside `GuardMiddleware`, so the body is already capped and the caller authenticated before
    anything here touches a replica.
    """

    def __init__(self, app: ASGIApp, client: ClusterEngineClient) -> None:
        self.app = app
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session_id = _header(scope, SESSION_HEADER)
        if scope["method"] != "POST":
            token = _SCOPE.set(RequestScope(session_id=session_id))
            try:
                await self.app(scope, receive, send)
            finally:
                _SCOPE.reset(token)
            return
        messages: list[Message] = []
        try:
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
            body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
            model, stream = _peek(body)
            await self.client.prepare(model)
        except Exception as error:  # noqa: BLE001 - 413 from the guard, or no replica could describe the model
            await to_api_error(_client_error(_cause(error), during_request=False)).response()(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        token = _SCOPE.set(RequestScope(model=model, stream=stream, session_id=session_id))
        try:
            await self.app(scope, replay, send)
        finally:
            _SCOPE.reset(token)


def _peek(body: bytes) -> tuple[Optional[str], bool]:
    """The body's "model" and "stream" (a body that is not a JSON object is left to the route's 400)."""
    try:
        value = parse_json_object(body)
    except APIError:
        return None, True
    model = value.get("model")
    return (model if isinstance(model, str) and model else None), value.get("stream") is True


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1") or None
    return None
