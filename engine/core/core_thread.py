"""Transport: the engine core's loop on a thread of the serving process.

    client (any thread) ── send(command) ──> CommandQueue ──> EngineCore.run_loop (thread "pagoda-engine")
    client <──────────────── on_event(StepDone | HealthAnswer | AddRejected | CoreDied) ──┘

The default off CUDA, and wherever a second process is not worth it. The `EngineCore` is built on
the thread and only that thread touches it; a failure while building it is raised by the
constructor, a failure of the loop reaches the client as CoreDied. While the loop idles it looks at
the executor every second (`IdleWatch`), so a TP worker that dies between requests is reported too.
"""
from __future__ import annotations

import logging
import threading
import traceback
from typing import Optional

from ..config import EngineConfig
from ..executor.base import Executor
from .commands import Command, CommandQueue, CoreDied, EventSink, Shutdown
from .engine_core import EngineCore
from .idle_watch import IdleWatch

logger = logging.getLogger(__name__)


class CoreThread:
    pid: Optional[int] = None              # the core lives in this process

    def __init__(self, config: EngineConfig, on_event: EventSink,
                 executor_class: Optional[type[Executor]] = None) -> None:
        self._commands = CommandQueue()
        self._on_event = on_event
        self._startup_error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(config, executor_class), name="pagoda-engine",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout_s: float) -> None:
        """Asks the loop to leave after what was sent before, and joins it (idempotent)."""
        self._commands.put(Shutdown())
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error("the engine thread did not stop within %.0f s", timeout_s)

    def _run(self, config: EngineConfig, executor_class: Optional[type[Executor]]) -> None:
        try:
            core = EngineCore(config, executor_class)
        except BaseException as error:  # noqa: BLE001 - re-raised in the constructor's thread
            self._startup_error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            core.run_loop(IdleWatch(self._commands, core.check_health), self._on_event)
        except BaseException:  # noqa: BLE001 - any failure of the model or executor kills the engine
            self._on_event(CoreDied(f"the engine core failed (a step, or its executor's health):\n"
                                    f"{traceback.format_exc()}"))
        finally:
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001
                logger.exception("engine core shutdown failed")
