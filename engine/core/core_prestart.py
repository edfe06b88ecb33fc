"""An engine core process started before its config exists, so that its imports overlap the
serving process's own start-up.

    serving process                                  core process
    launch: PrestartedCore()  ── spawn ─────────────> imports torch, transformers, the engine core,
    imports, config, tokenizer ...                    the models and kernels (most of a cold start)
    CoreProcess(config, prestarted=...) ── pipe ───> (config, executor class) -> _core_main, as if
                                                      spawned now

A cold start of `pagoda serve` is mostly Python imports, done twice: once by the server and once by
the freshly spawned core. Spawned first, the core imports while the server imports and reads the
model's config. This module is light on purpose (no torch at import): it is imported by the command
line before anything heavy. A prestarted core that turns out not to be needed is `close()`d.
"""
from __future__ import annotations

import multiprocessing
import os
import weakref
from multiprocessing.connection import Connection
from typing import Any

from ..utils.child_process import stop_children


class PrestartedCore:
    """The handle: the process and the parent's end of its pipe, until `CoreProcess` takes them."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_prestarted_main, name="pagoda-engine-core",
                                       args=(child_conn, os.getpid()))
        self.process.start()
        child_conn.close()            # the core holds the only other end: EOF when it dies
        self._finalizer = weakref.finalize(self, stop_children, [(self.process, self.conn)], 0.0, 5.0)
        self._taken = False

    def take(self, config: Any, executor_class: Any) -> tuple[Any, Connection]:
        """Hands the core its config; returns (process, conn), from now on the caller's to stop.

        NOTE: the finalizer is detached, not handed over: it is tied to this handle's lifetime, and the
        handle may be collected while the core serves on (e.g. a local of a replica's constructor)."""
        assert not self._taken, "a prestarted core serves one engine"
        self._taken = True
        self._finalizer.detach()
        self.conn.send((config, executor_class))
        return self.process, self.conn

    def close(self) -> None:
        """Stops a prestarted core that will not be used (nothing once `take` handed it over)."""
        if not self._taken:
            self._finalizer()


def _prestarted_main(conn: Connection, parent_pid: int) -> None:
    # the imports the core needs anyway, while nothing waits for them yet
    from . import core_process
    from ..models import registry  # noqa: F401 - the model classes and, through them, the kernels
    from ..utils import startup_timeline
    from ..utils.child_process import leave

    startup_timeline.mark("imports")
    try:
        config, executor_class = conn.recv()
    except (EOFError, OSError):          # not needed after all, or the parent is gone
        leave(0)
    startup_timeline.mark("waiting for the config")
    core_process._core_main(config, executor_class, conn, parent_pid, prestarted=True)
