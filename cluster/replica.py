"""One model replica: a Ray Serve deployment class that owns one `AsyncEngine`.

    ingress ── handle.generate(ReplicaRequest) ──> LLMReplica.generate ──> AsyncEngine.generate
            <── stream of list[WireOutput] ───────   (outputs ready together go in one item)
      or, with the ingress's token channel (cluster/channels.py):
            <── Mailbox.put(items) ───────────────   every ready output of that ingress's requests
            <── LeaseEnd from generate ───────────   (the request's last outputs, when it is done)
    controller ── record_routing_stats() ────────> ReplicaReport (load, KV usage, cached prefix
                                                   hashes, metrics exposition, the console's entry
                                                   with last-minute latencies) -> every router
    controller ── check_health() ────────────────> engine dead / step loop stalled -> raise

TP=1 runs the model in the engine core ("uni"; on GPU the core is a process of its own, so the step
loop never waits on this actor's Python work) or one worker process under it ("mp"); the actor holds
the GPU. TP>1 drives `Worker` actors through `RayExecutor`, inside the placement group Serve
reserved for this replica; on GPU from the engine's core process too (`RayExecutorInCore`).

Health: Serve restarts a replica whose `check_health` raises. It raises when the engine is dead (a
step raised, a TP worker is gone, the executor's own health probe failed) or when the step loop has
had work but made no step for `stall_timeout_s` (a hung kernel or collective): `StepWatchdog`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from pagoda.engine.core.core_prestart import PrestartedCore
from pagoda.engine.entrypoints.console.status import replica_status, rolling_of
from pagoda.engine.errors import EngineDeadError
from pagoda.engine.outputs import EngineStats
from pagoda.engine.utils import startup_timeline

from .config import ModelDeployment
from .channels import ChannelRef
from .wire import LeaseEnd, ModelInfo, OutputEncoder, ReplicaReport, ReplicaRequest, WireOutput

if TYPE_CHECKING:
    from pagoda.engine.config import EngineArgs

# NOTE: this module is what a replica's process imports first (Serve unpickles `LLMReplica` by
# reference), so it imports nothing that pulls in torch or transformers: the constructor spawns the
# engine core process before it imports those, and the two imports overlap (core_prestart.py).

logger = logging.getLogger(__name__)

# Engine options the deployment sets itself (one name per concept: they live on ModelDeployment).
_DEPLOYMENT_OWNED = frozenset({"model", "served_model_name", "tensor_parallel_size", "distributed_executor_backend"})
# How long `check_health` waits for the engine thread to answer; a step may be running, so a slow
# answer alone is not a failure (the watchdog judges stalls).
_HEALTH_PROBE_TIMEOUT_S = 5.0


@functools.cache
def engine_arg_names() -> frozenset[str]:
    from pagoda.engine.config import EngineArgs

    return frozenset(field.name for field in dataclasses.fields(EngineArgs))


def core_gets_a_process(deployment: ModelDeployment) -> bool:
    """Whether the replica's engine core runs in a process of its own, from the deployment alone (no
    torch import): asked for in `engine_args`, else on with CUDA, as `engine_args_for` decides."""
    engine_args = deployment.engine_args
    asked = engine_args.get("engine_core_process")
    if asked is not None:
        return bool(asked)
    return engine_args.get("device", "cuda" if deployment.num_gpus_per_worker > 0 else "cpu") == "cuda"


def engine_args_for(deployment: ModelDeployment) -> "EngineArgs":
    """The engine options of one replica; ValueError names unknown or misplaced `engine_args` keys."""
    from pagoda.engine.config import EngineArgs

    names = engine_arg_names()
    unknown = sorted(set(deployment.engine_args) - names)
    if unknown:
        raise ValueError(f"unknown engine_args {unknown} for model {deployment.name!r}; accepted: "
                         f"{', '.join(sorted(names - _DEPLOYMENT_OWNED))}")
    owned = sorted(set(deployment.engine_args) & _DEPLOYMENT_OWNED)
    if owned:
        raise ValueError(f"engine_args {owned} for model {deployment.name!r} are set by the deployment; "
                         "use the model-level options instead")
    tp = deployment.tensor_parallel_size
    engine_args = dict(deployment.engine_args)
    # NOTE: the resources the replica reserves decide its device, never what the process happens to
    # see: Ray leaves all of a node's GPUs visible to an actor that reserved none (a CPU replica on a
    # GPU node, or a TP>1 replica whose GPUs belong to its worker actors).
    engine_args.setdefault("device", "cuda" if deployment.num_gpus_per_worker > 0 else "cpu")
    if deployment.executor_backend == "ray":
        # the core in its own process, as for one-GPU replicas (EngineArgs leaves it off for 'ray':
        # only a replica can hand the core process its Ray connection)
        engine_args.setdefault("engine_core_process", engine_args["device"] == "cuda")
    return EngineArgs(model=deployment.model, served_model_name=deployment.name, tensor_parallel_size=tp,
                      distributed_executor_backend=deployment.executor_backend, **engine_args)


class StepWatchdog:
    """Flags a step loop that has work but has not finished a step for `stall_timeout_s`.

    Fed the engine's stats snapshot (refreshed after every step) and a clock; pure, so testable.
    """

    def __init__(self, stall_timeout_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._last_steps = -1
        self._last_progress = 0.0

    def stalled_for(self, stats: EngineStats, now: float) -> Optional[float]:
        """Seconds without a step while requests wait or run, once past the limit; else None."""
        has_work = stats.num_waiting + stats.num_running > 0
        if stats.num_steps != self._last_steps or not has_work:
            self._last_steps = stats.num_steps
            self._last_progress = now
            return None
        idle = now - self._last_progress
        return idle if idle > self.stall_timeout_s else None


class _Outbox:
    """What this replica owes one ingress's mailbox: sent as one call whenever the previous call
    returned (so a slow mailbox gets bigger batches, never more calls), in order."""

    def __init__(self, ref: ChannelRef, outboxes: dict[str, "_Outbox"]) -> None:
        self.ref = ref
        self.items: list[tuple[str, int, list[WireOutput]]] = []
        self.ready = asyncio.Event()
        self.closed = False
        self._outboxes = outboxes
        self._sender = asyncio.ensure_future(self._send())

    def put(self, request_id: str, seq: int, batch: list[WireOutput]) -> None:
        self.items.append((request_id, seq, batch))
        self.ready.set()

    async def _send(self) -> None:
        try:
            while True:
                await self.ready.wait()
                self.ready.clear()
                items, self.items = self.items, []
                await self.ref.mailbox.put.remote(items)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the ingress (and its mailbox) is gone
            logger.info("token mailbox %s unreachable (%s); dropping its outputs", self.ref.channel_id,
                        type(error).__name__)
        finally:
            self.closed = True
            if self._outboxes.get(self.ref.channel_id) is self:
                del self._outboxes[self.ref.channel_id]


class LLMReplica:
    """The Serve deployment class of one model (`app.py` names and sizes one deployment per model)."""

    def __init__(self, deployment: dict[str, Any], stall_timeout_s: float = 300.0) -> None:
        startup_timeline.mark("replica process to constructor")     # Ray's worker start, imports
        self.deployment = ModelDeployment.model_validate(deployment)
        # NOTE: the core process starts first, before this one imports torch and transformers (in
        # engine_args_for), and imports the engine while this one reads the config
        prestarted = PrestartedCore() if core_gets_a_process(self.deployment) else None
        try:
            args = engine_args_for(self.deployment)
            if prestarted is not None and not (args.engine_core_process is None or args.engine_core_process):
                prestarted.close()             # (core_gets_a_process and engine_args_for agree; defensive)
                prestarted = None
            self._build(args, prestarted, stall_timeout_s)
        except BaseException:
            if prestarted is not None:
                prestarted.close()
            raise

    def _build(self, args: "EngineArgs", prestarted: Optional[PrestartedCore], stall_timeout_s: float) -> None:
        if prestarted is not None and args.distributed_executor_backend != "ray":
            prestarted.send_args(args)         # the core builds its config as this replica builds its own
        config = args.create_config()
        startup_timeline.mark("config")
        executor_class: Any = None
        if args.distributed_executor_backend == "ray":
            from .ray_executor import RayExecutor, RayExecutorInCore

            executor_class = RayExecutorInCore.here() if config.parallel.engine_core_process else RayExecutor
        # NOTE: admission control is Serve's (max_ongoing_requests per replica, max_queued_requests
        # at the router); the engine queues whatever Serve lets through.
        from pagoda.engine.async_engine import AsyncEngine

        self.engine = AsyncEngine(config, max_queued_requests=None, executor_class=executor_class,
                                  prestarted_core=prestarted)
        startup_timeline.mark("engine core")
        self.watchdog = StepWatchdog(stall_timeout_s)
        self.replica_id = _replica_id()
        self._outboxes: dict[str, _Outbox] = {}     # token channel id -> what this replica owes it
        logger.info("replica %s serves %r (tensor_parallel_size=%d, max_model_len=%d)", self.replica_id,
                    self.deployment.name, args.tensor_parallel_size, self.engine.max_model_len)
        startup_timeline.ready("replica constructed")      # Serve then health-checks it and routes to it

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[Any]:
        """Streams the request's outputs; each item holds every output that was ready (usually one).

        With `request.channel` set, the outputs go to that ingress's mailbox instead (`_Outbox`)
        and this call yields a single `LeaseEnd` when the request is done: it stays the request's
        handle for routing, load, cancellation and failure, while its tokens travel batched.

        Engine errors (ValueError, EngineDeadError, ...) raise through to the ingress. When the caller
        goes away, Serve cancels this generator and the request is aborted in the engine.
        """
        if request.channel is None:
            async for batch in self._batches(request):
                yield batch
            return
        outbox = self._outbox(request.channel)
        sent = 0
        final: list[WireOutput] = []
        async for batch in self._batches(request):
            if any(wire.finished for wire in batch):
                # the last batch (the finished output) travels with the LeaseEnd, so the ingress
                # never waits on the channel for the end; every other batch goes out at once
                final = batch
            else:
                outbox.put(request.request_id, sent, batch)
                sent += 1
        yield LeaseEnd(replica_id=self.replica_id, num_batches=sent, final=final)

    def _outbox(self, ref: ChannelRef) -> "_Outbox":
        outbox = self._outboxes.get(ref.channel_id)
        if outbox is None or outbox.closed:
            outbox = self._outboxes[ref.channel_id] = _Outbox(ref, self._outboxes)
        return outbox

    async def _batches(self, request: ReplicaRequest) -> AsyncIterator[list[WireOutput]]:
        """The request's outputs as wire batches: each holds every output that was ready."""
        outputs = self.engine.generate(request.prompt, request.params, request.request_id, request.priority)
        encoder = OutputEncoder()
        ready: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for output in outputs:
                    ready.put_nowait(output)
            except BaseException as error:  # noqa: BLE001 - handed to the consumer below
                ready.put_nowait(error)
                return
            ready.put_nowait(done)

        task = asyncio.ensure_future(pump())
        try:
            while True:
                items = [await ready.get()]
                while not ready.empty():
                    items.append(ready.get_nowait())
                batch = []
                for item in items:
                    if isinstance(item, BaseException):
                        if batch:
                            yield batch
                        raise item
                    if item is done:
                        if batch:
                            yield batch
                        return
                    batch.append(encoder.encode(item))
                yield batch
        finally:
            # NOTE: cancelling the pump closes the engine's stream, which aborts the request there.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def describe(self) -> ModelInfo:
        config = self.engine.config
        return ModelInfo(served_model_name=self.engine.model_names[0], max_model_len=self.engine.max_model_len,
                         block_size=config.cache.block_size,
                         enable_prefix_caching=config.cache.enable_prefix_caching, tokenizer=self.engine.tokenizer,
                         model_format=config.serving_format(),
                         generation_defaults=config.model.generation_defaults)

    async def report(self) -> ReplicaReport:
        stats = await self.engine.get_stats()
        healthy = not self.engine.errored and self.watchdog.stalled_for(stats, time.monotonic()) is None
        console = replica_status(self.replica_id, "running" if healthy else "unhealthy", stats,
                                 rolling_of(self.engine, self.engine.model_names[0]))
        return ReplicaReport(
            replica_id=self.replica_id, model_name=self.deployment.name,
            stats=dataclasses.replace(stats, cached_prefix_hashes=[]), prefix_hashes=list(stats.cached_prefix_hashes),
            healthy=healthy, metrics=await self.engine.render_metrics(), reported_at=time.time(),
            console=console.to_dict())

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's hook, polled every `request_routing_stats_period_s`: the report every router reads."""
        return (await self.report()).to_routing_stats()

    async def check_health(self) -> None:
        """Serve's hook: raising marks this replica unhealthy, and Serve replaces it."""
        if self.engine.errored:
            raise EngineDeadError()
        stalled = self.watchdog.stalled_for(await self.engine.get_stats(), time.monotonic())
        if stalled is not None:
            raise RuntimeError(f"the engine has had requests but made no step for {stalled:.0f} s "
                               f"(limit {self.watchdog.stall_timeout_s:g} s): the step loop is stuck")
        try:
            # Reaches the executor (TP workers alive?) through the engine thread, between steps.
            await asyncio.wait_for(self.engine.check_health(), _HEALTH_PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass    # a long step is running; the watchdog above catches a stuck one

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests construct the class directly)
        return "local"
