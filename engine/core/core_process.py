"""Transport: the engine core's loop in a process of its own, so that the step loop never waits on
the serving process's Python.

    serving process                                         core process (_core_main)
    client ── send(command) ──> CommandQueue ──> sender thread ──pipe──> EngineCore.run_loop
    client <── on_event(event) ── reader thread <──────────────pipe──── StepDone | HealthAnswer | ...

Why: in one process the step loop (scheduling, launching the model) and the event loop (tokenizing,
detokenizing, formatting and sending every token of every stream) share one GIL, so under load each
waits on the other and the device idles between steps. Here the core only schedules, runs the model
and pickles token ids; the server keeps all text work.

The pipe carries the typed commands and events of `commands.py`: parent -> core a list of commands
per message (a sender thread drains the queue, so the client never blocks on a full pipe); core ->
parent `CoreReady` once, then the loop's events, and `CoreDied` with the traceback before it exits
on a failed step (or a failed look at the executor while idle: `IdleWatch`, so a TP worker that
dies between requests is reported too). The parent reads in a thread of its own, so the core never
blocks on a full pipe while the parent is writing (the one deadlock two pipes could have).

No orphans: the core exits on EOF of its command pipe and, should it be blocked in a step, when its
parent pid changes; `shutdown` joins it, then terminates and kills it. It is not a daemon process:
it may itself spawn TP workers (the multiproc executor), which daemon processes cannot.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Optional, Protocol

import torch.multiprocessing as mp

from ..config import EngineConfig
from ..executor.base import Executor
from ..utils import startup_timeline
from ..utils.child_process import exit_when_parent_dies, how_it_ended, leave, stop_children
from .commands import Command, CommandQueue, CoreDied, Event, EventSink, Shutdown
from .engine_core import EngineCore
from .idle_watch import IdleWatch

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0        # weights, profiling and graph capture of a large model


class Prestarted(Protocol):
    """A core process spawned ahead of its config (core_prestart.PrestartedCore, which imports this
    module in the child: hence a protocol here, not an import)."""

    def take(self, config: EngineConfig, executor_class: Optional[type[Executor]]) -> tuple[Any, Connection]:
        """Hands over the config; returns (process, conn) for the caller to own."""


class CoreProcessError(RuntimeError):
    """The core process failed to start."""


@dataclass
class CoreReady:
    """The core process's first message: the engine is built and the KV cache sized."""
    num_blocks: int


@dataclass
class _StartupFailed:
    traceback: str


class CoreProcess:
    """The parent's handle. The constructor returns once the core is built (raising
    CoreProcessError if it failed); then `send` commands, events arrive through `on_event` on
    the reader thread, and `shutdown` stops it all."""

    def __init__(self, config: EngineConfig, on_event: EventSink,
                 executor_class: Optional[type[Executor]] = None,
                 prestarted: Optional[Prestarted] = None) -> None:
        """prestarted: a core process spawned earlier (core_prestart.py), handed the config instead
        of spawning one now."""
        if prestarted is not None:
            self._process, self._conn = prestarted.take(config, executor_class)
        else:
            context = mp.get_context("spawn")
            self._conn, child_conn = context.Pipe()
            self._process = context.Process(target=_core_main, name="pagoda-engine-core",
                                            args=(config, executor_class, child_conn, os.getpid()))
            self._process.start()
            child_conn.close()            # the core holds the only other end: EOF when it dies
        self._finalizer = weakref.finalize(self, stop_children, [(self._process, self._conn)], 0.0, 5.0)
        try:
            ready = self._wait_until_built()
        except BaseException:
            self._finalizer()
            raise
        config.finalize_capacity(ready.num_blocks)       # what the core sized, on this side too
        self._on_event = on_event
        self._commands = CommandQueue()
        self._stopping = False
        self._sender = threading.Thread(target=self._send_commands, name="pagoda-core-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_events, name="pagoda-core-reader", daemon=True)
        self._sender.start()
        self._reader.start()

    def _wait_until_built(self) -> CoreReady:
        try:
            ready = wait([self._conn, self._process.sentinel], timeout=STARTUP_TIMEOUT_S)
            if self._conn not in ready and not self._conn.poll():
                raise CoreProcessError(self._exit_message("start-up") if ready else
                                       f"the engine core did not start within {STARTUP_TIMEOUT_S:.0f} s")
            message = self._conn.recv()
        except (EOFError, OSError):
            raise CoreProcessError(self._exit_message("start-up")) from None
        if isinstance(message, _StartupFailed):
            raise CoreProcessError(f"the engine core failed to start:\n{message.traceback}")
        assert isinstance(message, CoreReady), f"unexpected first message {message!r}"
        return message

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def shutdown(self, timeout_s: float) -> None:
        """Asks the core to leave (its executor too) after what was sent before; waits most of
        timeout_s for it, then kills it, and the rest for the reader."""
        self._stopping = True
        self._commands.put(Shutdown())
        self._sender.join(0.1 * timeout_s)
        self._process.join(0.8 * timeout_s)
        self._finalizer()
        self._reader.join(0.1 * timeout_s)

    def _exit_message(self, during: str) -> str:
        return f"the engine core process (pid {self._process.pid}) {how_it_ended(self._process)} during {during}"

    # -- the parent's threads ----------------------------------------------------------------------
    def _send_commands(self) -> None:
        while True:
            commands = self._commands.take(block=True)
            try:
                self._conn.send(commands)
            except OSError:           # the core is gone; the reader reports why
                return
            if any(isinstance(command, Shutdown) for command in commands):
                return

    def _read_events(self) -> None:
        try:
            while True:
                try:
                    event: Event = self._conn.recv()
                except (EOFError, OSError):
                    if not (self._stopping or sys.is_finalizing()):
                        self._on_event(CoreDied(self._exit_message("serving")))
                    return
                self._on_event(event)
                if isinstance(event, CoreDied):
                    return
        except BaseException as error:  # noqa: BLE001 - e.g. a message that does not unpickle
            logger.exception("reading the engine core's outputs failed")
            self._on_event(CoreDied(f"reading the engine core's outputs failed: {type(error).__name__}: {error}"))


# -- the core process ------------------------------------------------------------------------------
def config_from_args(engine_args: Any, conn: Connection) -> EngineConfig:
    """A prestarted core's own config (core_prestart.py), built as the serving process builds its
    copy; NOTE: quietly: that process logs what building it says (e.g. the generation defaults). A
    failure is reported like a failed start-up (the serving process, building the same config,
    normally raises the same error first)."""
    try:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return engine_args.create_config()
        finally:
            logging.disable(previous)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        _send_quietly(conn, _StartupFailed(traceback.format_exc()))
        leave(1)
        raise       # (leave does not return)


def _core_main(config: EngineConfig, executor_class: Optional[type[Executor]], conn: Connection,
               parent_pid: int, prestarted: bool = False) -> None:
    if not prestarted:
        startup_timeline.mark("imports")               # spawned: from the process's start to here
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # Ctrl-C reaches the group; the parent decides
    threading.Thread(target=exit_when_parent_dies, args=(parent_pid,), name="pagoda-parent-watch",
                     daemon=True).start()
    try:
        core = EngineCore(config, executor_class)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        _send_quietly(conn, _StartupFailed(traceback.format_exc()))
        leave(1)
    pipe = _Pipe(conn)
    try:
        startup_timeline.ready()
        pipe.send(CoreReady(config.cache.num_blocks))
        core.run_loop(IdleWatch(pipe, core.check_health), pipe.send)
        code = 0
    except _ParentGone:                  # the parent is gone (or closed the pipe): leave
        code = 0
    except BaseException:  # noqa: BLE001 - a failed step (even an OSError in it) kills the engine
        _send_quietly(conn, CoreDied("the engine core failed in its process (a step, or its executor's health):\n"
                                     + traceback.format_exc()))
        code = 1
    try:
        core.shutdown()
    except Exception:  # noqa: BLE001
        logger.exception("engine core shutdown failed")
    leave(code)


class _ParentGone(Exception):
    """The pipe to the serving process is closed: it left or is shutting down."""


class _Pipe:
    """The core's end of the pipe, as the loop's inbox and event sink. Only its own I/O errors mean
    "the parent is gone" (an OSError raised inside a step is a failed step)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def take(self, block: bool, timeout_s: Optional[float] = None) -> list[Command]:
        """What has arrived; idle (block=True), waits for the next message, at most timeout_s."""
        commands: list[Command] = []
        try:
            timeout = timeout_s if block else 0.0
            while self.conn.poll(timeout):
                commands += self.conn.recv()
                timeout = 0.0
        except (EOFError, OSError):
            raise _ParentGone() from None
        return commands

    def send(self, event: Event) -> None:
        try:
            self.conn.send(event)
        except OSError:
            raise _ParentGone() from None


def _send_quietly(conn: Connection, message: object) -> None:
    try:
        conn.send(message)
    except OSError:
        pass
