"""The engine behind the servers: many coroutines submit requests, one thread runs the step loop.

    event loop thread                                    engine thread (owns the EngineCore)
    -----------------                                    -----------------------------------
    generate(): tokenize (InputProcessor) -- add ----->  commands ─┐  wait while idle (no spin)
    consumer gone / abort() / stop string -- abort --->  commands ─┤  apply -> step() -> stats
    _on_core_outputs(): detokenize (OutputProcessor) <─────────────┘  loop.call_soon_threadsafe
        -> one asyncio.Queue per request -> generate() yields RequestOutputs (what queued up
           while the consumer was busy comes as one merged output)

With `engine_core_process` (the default on CUDA) the EngineCore runs in a process of its own
(core/core_process.py) and the engine thread only forwards commands to it, while a reader thread hands its
outputs to the event loop: the step loop then never shares a GIL with the server's text work.

Only the engine thread touches the `EngineCore` (it is even built there); the event loop reaches it
through the command list alone. Tokenization and detokenization run on the event loop, never inside
the step loop, so the model is never held up by text work, and the tokenizer is used from one
thread only. A step that raises kills the engine: every in-flight request gets `EngineDeadError`,
new requests are refused and `is_healthy()` turns False; nothing hangs.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from .config import EngineArgs, EngineConfig
from .core.core_process import CoreProcess
from .core.engine_core import EngineCore
from .core.request import Request
from .errors import EngineDeadError, EngineOverloadedError, EngineShuttingDownError
from .executor.base import Executor
from .llm_engine import load_text_side
from .metrics import EngineMetrics
from .outputs import EngineCoreOutput, EngineStats, RequestOutput, merge_outputs
from .processing.input_processor import InputProcessor, PromptType
from .processing.output_processor import OutputProcessor
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_HEALTH_TIMEOUT_S = 30.0
_CORE_STOP_TIMEOUT_S = 30.0


@dataclass
class _AddCommand:
    request_id: str                      # the parent (client-visible) id
    core_requests: list[Request]


@dataclass
class _AbortCommand:
    core_request_ids: list[str]


@dataclass
class _HealthCommand:
    future: asyncio.Future


@dataclass
class _Stream:
    """The event-loop side of one request: where its outputs go."""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class AsyncEngine:
    """Implements the `EngineClient` protocol in one process.

    max_queued_requests: refuse new requests (EngineOverloadedError) while this many already wait
        for a seat in the batch; None = unbounded.
    executor_class: passed to `EngineCore` (tests inject a failing executor).
    """

    def __init__(self, config: EngineConfig, max_queued_requests: Optional[int] = None,
                 executor_class: Optional[type[Executor]] = None) -> None:
        if max_queued_requests is not None and (not isinstance(max_queued_requests, int) or max_queued_requests < 0):
            raise ValueError(f"max_queued_requests must be an integer >= 0 or None, got {max_queued_requests!r}")
        self.config = config
        self.max_queued_requests = max_queued_requests
        self._tokenizer, eos_token_ids = load_text_side(config)
        self.input_processor = InputProcessor(config, self._tokenizer, eos_token_ids)
        self.output_processor = OutputProcessor(self._tokenizer)
        self.metrics = EngineMetrics()

        # Shared between the two threads, always under _cv.
        self._cv = threading.Condition()
        self._commands: list[Any] = []
        self._pending_adds = 0                 # core requests sent but not yet reflected in _stats
        self._stats = EngineStats()
        self._stopping = False
        self._dead = False

        # Event-loop side only.
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._streams: dict[str, _Stream] = {}
        self._health_futures: set[asyncio.Future] = set()
        self._accepting = True

        # Core-process mode only (engine_core_process): health probes in flight, by probe id.
        self._probes: dict[int, asyncio.Future] = {}
        self._probe_ids = itertools.count()
        self._core_pid: Optional[int] = None
        self._stop_timeout_s = _CORE_STOP_TIMEOUT_S       # shutdown()'s, once called

        self._startup_error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(executor_class,), name="pagoda-engine",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

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
    def errored(self) -> bool:
        with self._cv:
            return self._dead

    async def generate(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Streams one request's outputs; the last has `finished=True`.

        Raises before the first output: ValueError (bad input), EngineOverloadedError,
        EngineShuttingDownError, EngineDeadError. If the consumer stops early, the request is aborted.
        """
        self._check_accepting()
        self._bind_loop()
        processed = self.input_processor.process(request_id, prompt, params, priority)
        request_id = processed.request_id
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._admit(len(processed.core_requests))
        stream = _Stream()
        self._streams[request_id] = stream
        self.output_processor.add_request(
            request_id, processed.prompt, processed.prompt_token_ids, processed.params,
            [r.request_id for r in processed.core_requests], processed.arrival_time)
        self._send(_AddCommand(request_id, processed.core_requests), num_adds=len(processed.core_requests))
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
        with self._cv:
            return self._stats

    async def check_health(self) -> None:
        """Raises EngineDeadError unless the engine thread and its executor are alive."""
        if self.errored or not self._thread.is_alive():
            raise EngineDeadError()
        future = self._bind_loop().create_future()
        self._health_futures.add(future)
        try:
            self._send(_HealthCommand(future))
            await asyncio.wait_for(future, _HEALTH_TIMEOUT_S)
        finally:
            self._health_futures.discard(future)

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
        """Aborts what is still running, stops the engine thread and joins it (idempotent)."""
        self._stop_timeout_s = timeout_s
        self._accepting = False
        if self._loop is not None and _running_loop() is self._loop:
            self._abort_all()
        elif self._loop is not None and self._loop.is_running():   # called from another thread
            self._post(self._abort_all)
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error("the engine thread did not stop within %.0f s", timeout_s)

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
        with self._cv:
            stats, pending = self._stats, self._pending_adds
        free_seats = max(0, self.config.scheduler.max_num_seqs - stats.num_running)
        num_queued = max(0, stats.num_waiting + pending - free_seats)
        if max(0, stats.num_waiting + pending + num_new - free_seats) > self.max_queued_requests:
            raise EngineOverloadedError(num_queued, self.max_queued_requests)

    def _send(self, command: Any, num_adds: int = 0) -> None:
        with self._cv:
            self._commands.append(command)
            self._pending_adds += num_adds
            self._cv.notify()

    def _abort_request(self, request_id: str) -> None:
        """Finishes a request on this side at once (final output: finish_reason 'abort') and in the core."""
        core_ids = self.output_processor.child_ids(request_id)
        final = self.output_processor.abort(request_id)
        if final is not None:
            self._deliver(final)
        if core_ids:
            self._send(_AbortCommand(core_ids))

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
            self._send(_AbortCommand(stop_string_hits))

    def _on_add_failed(self, request_id: str, error: Exception) -> None:
        self.output_processor.abort(request_id)
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(error)

    def _on_engine_dead(self) -> None:
        self._accepting = False
        for future in self._health_futures:      # the engine thread will never answer these
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
        """Runs callback(*args) on the event loop (from the engine thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:      # the loop is closed: nobody is listening any more
            pass

    # -- engine thread ------------------------------------------------------------------------------
    def _run(self, executor_class: Optional[type[Executor]]) -> None:
        if self.config.parallel.engine_core_process:
            self._run_core_process(executor_class)
            return
        try:
            core = EngineCore(self.config, executor_class)
        except BaseException as error:  # noqa: BLE001 - re-raised in the constructor's thread
            self._startup_error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            self._step_loop(core)
        except BaseException:  # noqa: BLE001 - any failure of the model or executor kills the engine
            logger.exception("engine step failed; the engine is dead and refuses new requests")
            with self._cv:
                self._dead = True
            self._post(self._on_engine_dead)
        finally:
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001
                logger.exception("engine core shutdown failed")

    def _step_loop(self, core: EngineCore) -> None:
        """Invariant: between two steps every queued command is applied, in the order it was sent."""
        while True:
            with self._cv:
                while not (self._commands or self._stopping or core.has_unfinished_requests()):
                    self._cv.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            num_added = 0
            for command in commands:
                if isinstance(command, _AddCommand):
                    num_added += len(command.core_requests)
                    try:
                        core.add_requests(command.core_requests)
                    except ValueError as error:       # e.g. its id is still live in the core
                        self._post(self._on_add_failed, command.request_id, error)
                elif isinstance(command, _AbortCommand):
                    core.abort_requests(command.core_request_ids)
                elif isinstance(command, _HealthCommand):
                    self._check_health(core, command.future)
            outputs = core.step() if core.has_unfinished_requests() else []
            stats = core.get_stats()
            with self._cv:
                self._stats = stats
                self._pending_adds -= num_added
            if outputs:
                self._post(self._on_core_outputs, outputs)

    # -- engine thread, with the core in its own process ---------------------------------------------
    def _run_core_process(self, executor_class: Optional[type[Executor]]) -> None:
        """Starts the core process, then forwards commands to it until shutdown; a second thread
        (`_read_core`) hands its outputs to the event loop."""
        try:
            core = CoreProcess(self.config, executor_class)
            self.config.finalize_capacity(core.num_blocks)     # what the core sized, on this side too
        except BaseException as error:  # noqa: BLE001 - re-raised in the constructor's thread
            self._startup_error = error
            self._ready.set()
            return
        self._core_pid = core.pid
        reader = threading.Thread(target=self._read_core, args=(core,), name="pagoda-engine-reader", daemon=True)
        reader.start()
        self._ready.set()
        try:
            self._forward_commands(core)
        finally:
            # within the caller's shutdown timeout: most of it for the core, the rest for the reader
            core.stop(0.8 * self._stop_timeout_s)
            reader.join(0.1 * self._stop_timeout_s)

    def _forward_commands(self, core: CoreProcess) -> None:
        while True:
            with self._cv:
                while not (self._commands or self._stopping or self._dead):
                    self._cv.wait()
                if self._stopping or self._dead:
                    return
                commands, self._commands = self._commands, []
            message: list[tuple] = []
            for command in commands:
                if isinstance(command, _AddCommand):
                    message.append(("add", command.request_id, command.core_requests))
                elif isinstance(command, _AbortCommand):
                    message.append(("abort", command.core_request_ids))
                elif isinstance(command, _HealthCommand):
                    probe = next(self._probe_ids)
                    self._probes[probe] = command.future
                    message.append(("health", probe))
            try:
                core.send(("commands", message))
            except OSError:          # the core is gone; the reader reports why
                return

    def _read_core(self, core: CoreProcess) -> None:
        try:
            self._read_core_messages(core)
        except BaseException as error:  # noqa: BLE001 - e.g. a message that does not unpickle
            logger.exception("reading the engine core's outputs failed")
            self._core_died(f"reading the engine core's outputs failed: {type(error).__name__}: {error}")

    def _read_core_messages(self, core: CoreProcess) -> None:
        while True:
            try:
                kind, *payload = core.recv()
            except (EOFError, OSError):
                with self._cv:
                    if self._stopping or sys.is_finalizing():
                        return
                self._core_died(core.exit_message("serving"))
                return
            if kind == "step":
                outputs, stats, num_added, prefix_changed = payload
                with self._cv:
                    if not prefix_changed:
                        stats.cached_prefix_hashes = self._stats.cached_prefix_hashes
                    self._stats = stats
                    self._pending_adds -= num_added
                if outputs:
                    self._post(self._on_core_outputs, outputs)
            elif kind == "health":
                probe, error = payload
                future = self._probes.pop(probe, None)
                if future is not None:
                    self._post(_resolve_probe, future, error)
            elif kind == "add_failed":
                request_id, message = payload
                self._post(self._on_add_failed, request_id, ValueError(message))
            elif kind == "dead":
                self._core_died(f"engine step failed in the core process:\n{payload[0]}")
                return

    def _core_died(self, reason: str) -> None:
        logger.error("%s; the engine is dead and refuses new requests", reason)
        with self._cv:
            self._dead = True
            self._cv.notify()
        self._post(self._on_engine_dead)

    def _check_health(self, core: EngineCore, future: asyncio.Future) -> None:
        try:
            core.check_health()
        except BaseException as error:
            self._post(_resolve_probe, future, f"{type(error).__name__}: {error}")
            raise
        self._post(_resolve_probe, future, None)


def _resolve_probe(future: asyncio.Future, error: Optional[str]) -> None:
    """Answers a health probe on the event loop: None = healthy, else what failed."""
    if future.done():
        return
    if error is not None:
        future.set_exception(EngineDeadError())
    else:
        future.set_result(None)


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
