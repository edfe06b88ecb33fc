"""The engine behind the servers: many coroutines submit requests, the engine core's loop runs steps.

    event loop                                              engine core (core/engine_core.py run_loop)
    ----------                                              ------------------------------------------
    generate(): tokenize (InputProcessor) -- AddRequests -->  ┐ a transport: core/core_thread.py (a thread
    consumer gone / abort() / stop string -- AbortRequests ->  │ here) or core/core_process.py (a process of
    check_health() ------------------------ CheckHealth ---->  │ its own, the default on CUDA)
    _on_core_outputs(): detokenize (OutputProcessor) <─ StepDone, HealthAnswer, AddRejected, CoreDied
        -> one asyncio.Queue per request -> generate() yields RequestOutputs (what queued up
           while the consumer was busy comes as one merged output)

The event loop reaches the core through typed commands alone (core/commands.py), and hears back
through events delivered on a transport thread, which hands them to the event loop. Tokenization
and detokenization never run inside the step loop, so the model is never held up by text work; a
long prompt is tokenized on the input processor's worker thread, so the event loop is not either
(the fast tokenizer is safe to share between the two threads). A step that raises kills the
engine: every in-flight request gets `EngineDeadError`, new requests are refused and
`is_healthy()` turns False; nothing hangs.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Union

from .config import EngineArgs, EngineConfig
from .core.commands import (AbortRequests, AddRejected, AddRequests, CheckHealth, Command, CoreDied, Event,
                            HealthAnswer, StepDone)
from .core.core_prestart import PrestartedCore
from .core.core_process import CoreProcess
from .core.core_thread import CoreThread
from .errors import EngineDeadError, EngineOverloadedError, EngineShuttingDownError
from .executor.base import Executor
from .generation_defaults import GenerationDefaults
from .llm_engine import load_text_side
from .metrics import EngineMetrics
from .outputs import EngineCoreOutput, EngineStats, RequestOutput, merge_outputs
from .processing.input_processor import InputProcessor, PromptType
from .processing.output_processor import OutputProcessor
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_HEALTH_TIMEOUT_S = 30.0


@dataclass
class _Stream:
    """The event-loop side of one request: where its outputs go."""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class AsyncEngine:
    """Implements the `EngineClient` protocol in one process (its core on a thread or in a child).

    max_queued_requests: refuse new requests (EngineOverloadedError) while this many already wait
        for a seat in the batch; None = unbounded.
    executor_class: passed to `EngineCore` (tests inject a failing executor).
    prestarted_core: a core process spawned ahead (core_prestart.py) that the core takes when it runs
        in a process of its own; closed otherwise.
    """

    def __init__(self, config: EngineConfig, max_queued_requests: Optional[int] = None,
                 executor_class: Optional[type[Executor]] = None,
                 prestarted_core: Optional[PrestartedCore] = None) -> None:
        if max_queued_requests is not None and (not isinstance(max_queued_requests, int) or max_queued_requests < 0):
            raise ValueError(f"max_queued_requests must be an integer >= 0 or None, got {max_queued_requests!r}")
        self.config = config
        self.max_queued_requests = max_queued_requests
        self.metrics = EngineMetrics()

        # Written by the transport's thread, read anywhere: always under _lock.
        self._lock = threading.Lock()
        self._pending_adds = 0                 # core requests sent but not yet reflected in _stats
        self._stats = EngineStats()
        self._dead = False

        # Event-loop side only.
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._streams: dict[str, _Stream] = {}
        self._probes: dict[int, asyncio.Future] = {}        # health probes in flight, by probe id
        self._probe_ids = itertools.count()
        self._accepting = True

        if prestarted_core is not None and not config.parallel.engine_core_process:
            prestarted_core.close()            # started on a guess that the core would get a process
            prestarted_core = None
        # NOTE: the tokenizer loads on a thread while the core starts (weights, KV cache, CUDA graphs):
        # neither needs the other, and no event reaches the processors before this returns.
        with ThreadPoolExecutor(1, thread_name_prefix="pagoda-tokenizer-load") as pool:
            text_side = pool.submit(load_text_side, config)
            self.core_client: Union[CoreThread, CoreProcess] = (
                CoreProcess(config, self._on_core_event, executor_class, prestarted_core)
                if config.parallel.engine_core_process else CoreThread(config, self._on_core_event, executor_class))
        try:
            self._tokenizer, eos_token_ids = text_side.result()
        except BaseException:
            self.core_client.shutdown(5.0)
            raise
        self.input_processor = InputProcessor(config, self._tokenizer, eos_token_ids)
        self.output_processor = OutputProcessor(self._tokenizer)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, max_queued_requests: Optional[int] = None) -> "AsyncEngine":
        return cls(args.create_config(), max_queued_requests=max_queued_requests)

    # -- the EngineClient protocol ------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return [self.config.model.served_model_name]

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    @property
    def model_format(self) -> dict[str, Optional[str]]:
        return self.config.serving_format()

    @property
    def generation_defaults(self) -> GenerationDefaults:
        return self.config.model.generation_defaults

    @property
    def errored(self) -> bool:
        with self._lock:
            return self._dead

    async def generate(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Streams one request's outputs; the last has `finished=True`.

        Raises before the first output: ValueError (bad input), EngineOverloadedError,
        EngineShuttingDownError, EngineDeadError. If the consumer stops early, the request is aborted.
        """
        self._check_accepting()
        self._bind_loop()
        # NOTE: a long text prompt is tokenized on the input processor's worker thread, so the event
        # loop keeps serving meanwhile; the engine may have begun to shut down by the time it is done.
        processed = await self.input_processor.process_async(request_id, prompt, params, priority)
        self._check_accepting()
        request_id = processed.request_id
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._admit(len(processed.core_requests))
        stream = _Stream()
        self._streams[request_id] = stream
        self.output_processor.add_request(
            request_id, processed.prompt, processed.prompt_token_ids, processed.params,
            [r.request_id for r in processed.core_requests], processed.arrival_time)
        self._send(AddRequests(request_id, processed.core_requests), num_adds=len(processed.core_requests))
        try:
            pending: Optional[RequestOutput | BaseException] = None
            while True:
                item = pending if pending is not None else await stream.queue.get()
                pending = None
                if isinstance(item, BaseException):
                    raise item
                # A consumer that fell behind gets what queued up as one output (fewer, larger
                # chunks, e.g. SSE events, exactly when the serving side is the bottleneck).
                while not item.finished and not stream.queue.empty():
                    following = stream.queue.get_nowait()
                    if isinstance(following, BaseException):
                        pending = following
                        break
                    item = merge_outputs(item, following)
                yield item
                if item.finished:
                    return
        finally:
            # NOTE: runs on normal end, on an exception and when the consumer is cancelled or closes
            # the iterator; in the last two cases the request is still live in the core.
            if self._streams.pop(request_id, None) is not None and not stream.finished:
                self._abort_request(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_request(request_id)

    async def get_stats(self) -> EngineStats:
        with self._lock:
            return self._stats

    async def check_health(self) -> None:
        """Raises EngineDeadError unless the core's loop and its executor are alive."""
        if self.errored or not self.core_client.is_alive():
            raise EngineDeadError()
        future = self._bind_loop().create_future()
        probe_id = next(self._probe_ids)
        self._probes[probe_id] = future
        try:
            self._send(CheckHealth(probe_id))
            await asyncio.wait_for(future, _HEALTH_TIMEOUT_S)
        finally:
            self._probes.pop(probe_id, None)

    async def is_healthy(self) -> bool:
        try:
            await self.check_health()
        except (EngineDeadError, asyncio.TimeoutError):
            return False
        return True

    async def render_metrics(self) -> bytes:
        self.metrics.record_stats(self.model_names[0], await self.get_stats())
        return self.metrics.render()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Aborts what is still running, then stops the core's loop and waits for it (idempotent)."""
        self._accepting = False
        if self._loop is not None and _running_loop() is self._loop:
            self._abort_all()
        elif self._loop is not None and self._loop.is_running():   # called from another thread
            self._post(self._abort_all)
        self.core_client.shutdown(timeout_s)

    # -- event loop side ----------------------------------------------------------------------------
    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None or (self._loop.is_closed() and not self._streams):
            self._loop = loop     # first use, or the previous loop is gone (e.g. one asyncio.run per test)
        elif self._loop is not loop:
            raise RuntimeError("an AsyncEngine serves one event loop; it was first used from another one")
        return loop

    def _check_accepting(self) -> None:
        if self.errored:
            raise EngineDeadError()
        if not self._accepting:
            raise EngineShuttingDownError()

    def _admit(self, num_new: int) -> None:
        """Refuses the request when the waiting queue is full.

        Requests sent but not yet seen by the scheduler, and those waiting in it, first take the free
        seats of the batch (max_num_seqs - running); what is left over is queued. So a burst into an
        idle engine is accepted, and a busy engine queues at most max_queued_requests.
        """
        if self.max_queued_requests is None:
            return
        with self._lock:
            stats, pending = self._stats, self._pending_adds
        free_seats = max(0, self.config.scheduler.max_num_seqs - stats.num_running)
        num_queued = max(0, stats.num_waiting + pending - free_seats)
        if max(0, stats.num_waiting + pending + num_new - free_seats) > self.max_queued_requests:
            raise EngineOverloadedError(num_queued, self.max_queued_requests)

    def _send(self, command: Command, num_adds: int = 0) -> None:
        if num_adds:
            with self._lock:
                self._pending_adds += num_adds
        self.core_client.send(command)

    def _abort_request(self, request_id: str) -> None:
        """Finishes a request on this side at once (final output: finish_reason 'abort') and in the core."""
        core_ids = self.output_processor.child_ids(request_id)
        final = self.output_processor.abort(request_id)
        if final is not None:
            self._deliver(final)
        if core_ids:
            self._send(AbortRequests(core_ids))

    def _abort_all(self) -> None:
        self._accepting = False
        for request_id in list(self._streams):
            self._abort_request(request_id)

    def _deliver(self, output: RequestOutput, now: Optional[float] = None) -> None:
        self.metrics.observe(self.model_names[0], output, now)
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            stream.finished = True
        stream.queue.put_nowait(output)

    def _on_core_outputs(self, core_outputs: list[EngineCoreOutput]) -> None:
        outputs, stop_string_hits = self.output_processor.process(core_outputs)
        now = time.monotonic()
        for output in outputs:
            self._deliver(output, now)
        if stop_string_hits:      # finished here by a stop string: the core must stop them too
            self._send(AbortRequests(stop_string_hits))

    def _on_add_rejected(self, request_id: str, error: Exception) -> None:
        self.output_processor.abort(request_id)
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(error)

    def _on_health_answer(self, probe_id: int, error: Optional[str]) -> None:
        future = self._probes.get(probe_id)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(EngineDeadError())
        else:
            future.set_result(None)

    def _on_engine_dead(self) -> None:
        self._accepting = False
        for future in self._probes.values():      # the loop will never answer these
            if not future.done():
                future.set_exception(EngineDeadError())
        for request_id, stream in self._streams.items():
            final = self.output_processor.abort(request_id)
            if final is not None:
                for completion in final.outputs:
                    completion.finish_reason = "error"
                self.metrics.observe(self.model_names[0], final)
            stream.finished = True
            stream.queue.put_nowait(EngineDeadError(
                "the engine failed while running this request and has stopped", during_request=True))

    def _post(self, callback: Any, *args: Any) -> None:
        """Runs callback(*args) on the event loop (from a transport's thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:      # the loop is closed: nobody is listening any more
            pass

    # -- the transport's thread ---------------------------------------------------------------------
    def _on_core_event(self, event: Event) -> None:
        """Called on the transport's thread for every event of the core's loop."""
        if isinstance(event, StepDone):
            with self._lock:
                if not event.prefix_summary_changed:
                    event.stats.cached_prefix_hashes = self._stats.cached_prefix_hashes
                self._stats = event.stats
                self._pending_adds -= event.num_added
            if event.outputs:
                self._post(self._on_core_outputs, event.outputs)
        elif isinstance(event, HealthAnswer):
            self._post(self._on_health_answer, event.probe_id, event.error)
        elif isinstance(event, AddRejected):
            self._post(self._on_add_rejected, event.request_id, ValueError(event.message))
        elif isinstance(event, CoreDied):
            logger.error("%s; the engine is dead and refuses new requests", event.reason)
            with self._lock:
                self._dead = True
            self._post(self._on_engine_dead)


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
