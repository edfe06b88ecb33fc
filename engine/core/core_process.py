"""The engine core in a process of its own, so that the step loop never waits on the server's Python.

    serving process (AsyncEngine)                            core process (_core_main)
    event loop ── _send(command) ──> sender thread ──pipe──> between steps: apply add / abort / health
                                                             step() (busy while there is work)
    event loop <── call_soon_threadsafe ── reader thread <── ("step", outputs, stats, number added)

Why: in one process the step loop (scheduling, launching the model) and the event loop (tokenizing,
detokenizing, formatting and sending every token of every stream) share one GIL, so under load each
waits on the other and the device idles between steps. Here the core only schedules, runs the model
and pickles token ids; the server keeps all text work.

Protocol. Parent -> core: ("commands", [("add", request id, [Request]), ("abort", [core ids]),
("health", probe id)]) or ("shutdown",). Core -> parent: ("ready", num_blocks) once, then ("step",
outputs, EngineStats, number of core requests added since the last message, whether the stats'
prefix summary changed), ("health", probe id,
error or None), ("add_failed", request id, message), and ("dead", traceback) before it exits on a
failed step. The parent reads in a thread of its own, so the core never blocks on a full pipe while
the parent is writing (the one deadlock two pipes could have).

No orphans: the core exits on EOF of its command pipe and, should it be blocked in a step, when its
parent pid changes; `stop` joins it, then terminates and kills it. It is not a daemon process: it
may itself spawn TP workers (the multiproc executor), which daemon processes cannot.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

import torch.multiprocessing as mp

from ..config import EngineConfig
from ..executor.base import Executor
from ..utils.child_process import exit_when_parent_dies, how_it_ended, leave, stop_children
from .engine_core import EngineCore

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 1800.0        # weights, profiling and graph capture of a large model


class CoreProcessError(RuntimeError):
    """The core process failed to start, or died."""


class CoreProcess:
    """The parent's handle: start (waits until the core is built), send, recv, stop."""

    def __init__(self, config: EngineConfig, executor_class: Optional[type[Executor]] = None) -> None:
        context = mp.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_core_main, name="pagoda-engine-core",
                                       args=(config, executor_class, child_conn, os.getpid()))
        self.process.start()
        child_conn.close()            # the core holds the only other end: EOF when it dies
        self._send_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, stop_children, [(self.process, self.conn)], 0.0, 5.0)
        try:
            ready = wait([self.conn, self.process.sentinel], timeout=STARTUP_TIMEOUT_S)
            if self.conn not in ready and not self.conn.poll():
                raise CoreProcessError(self.exit_message("start-up") if ready else
                                       f"the engine core did not start within {STARTUP_TIMEOUT_S:.0f} s")
            kind, payload = self.conn.recv()
            if kind != "ready":
                raise CoreProcessError(f"the engine core failed to start:\n{payload}")
        except (EOFError, OSError):
            self._finalizer()
            raise CoreProcessError(self.exit_message("start-up")) from None
        except BaseException:
            self._finalizer()
            raise
        self.num_blocks: int = payload

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid

    def send(self, message: tuple) -> None:
        """Raises OSError once the core is gone."""
        with self._send_lock:
            self.conn.send(message)

    def recv(self) -> tuple:
        """The core's next message; EOFError / OSError once it is gone."""
        return self.conn.recv()

    def exit_message(self, during: str) -> str:
        return f"the engine core process (pid {self.process.pid}) {how_it_ended(self.process)} during {during}"

    def stop(self, timeout_s: float) -> None:
        """Asks the core to shut down (its executor too), waits up to timeout_s, then kills it."""
        try:
            self.send(("shutdown",))
        except OSError:
            pass
        self.process.join(timeout=timeout_s)
        self._finalizer()


# -- the core process ------------------------------------------------------------------------------
def _core_main(config: EngineConfig, executor_class: Optional[type[Executor]], conn: Connection,
               parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # Ctrl-C reaches the group; the parent decides
    threading.Thread(target=exit_when_parent_dies, args=(parent_pid,), name="pagoda-parent-watch",
                     daemon=True).start()
    try:
        core = EngineCore(config, executor_class)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        _send_quietly(conn, ("error", traceback.format_exc()))
        leave(1)
    pipe = _Pipe(conn)
    try:
        pipe.send(("ready", config.cache.num_blocks))
        _step_loop(core, pipe)
        code = 0
    except _ParentGone:                  # the parent is gone (or closed the pipe): leave
        code = 0
    except BaseException:  # noqa: BLE001 - a failed step (even an OSError in it) kills the engine
        _send_quietly(conn, ("dead", traceback.format_exc()))
        code = 1
    try:
        core.shutdown()
    except Exception:  # noqa: BLE001
        logger.exception("engine core shutdown failed")
    leave(code)


class _ParentGone(Exception):
    """The pipe to the serving process is closed: it left or is shutting down."""


class _Pipe:
    """The core's end of the pipe; only its own I/O errors mean "the parent is gone" (an OSError
    raised inside a step is a failed step)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def poll(self, timeout: Optional[float]) -> bool:
        try:
            return self.conn.poll(timeout)
        except (EOFError, OSError):
            raise _ParentGone() from None

    def recv(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise _ParentGone() from None

    def send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:
            raise _ParentGone() from None


def _step_loop(core: EngineCore, conn: _Pipe) -> None:
    """Invariant: between two steps every command that has arrived is applied, in arrival order.

    The stats ride every step message; their prefix summary (up to thousands of hashes, refreshed
    at most once a second) only when it changed: `prefix_changed` tells the parent to keep its own.
    """
    sent_summary: Optional[list[int]] = None
    while True:
        num_added = 0
        # idle: block until a command comes; busy: take only what is there
        timeout = 0.0 if core.has_unfinished_requests() else None
        while conn.poll(timeout):
            timeout = 0.0
            message = conn.recv()
            if message[0] == "shutdown":
                return
            for command in message[1]:
                kind = command[0]
                if kind == "add":
                    _, request_id, requests = command
                    num_added += len(requests)
                    try:
                        core.add_requests(requests)
                    except ValueError as error:            # e.g. its id is still live in the core
                        conn.send(("add_failed", request_id, str(error)))
                elif kind == "abort":
                    core.abort_requests(command[1])
                elif kind == "health":
                    try:
                        core.check_health()
                    except BaseException as error:
                        conn.send(("health", command[1], f"{type(error).__name__}: {error}"))
                        raise
                    conn.send(("health", command[1], None))
        outputs = core.step() if core.has_unfinished_requests() else []
        stats = core.get_stats()
        prefix_changed = stats.cached_prefix_hashes is not sent_summary
        if prefix_changed:
            sent_summary = stats.cached_prefix_hashes
        else:
            stats.cached_prefix_hashes = []
        conn.send(("step", outputs, stats, num_added, prefix_changed))


def _send_quietly(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:
        pass


