"""An engine core process started before its config exists, so that its imports overlap the
serving process's own start-up.

    serving process                                  core process
    launch: PrestartedCore()  ── spawn ─────────────> imports torch, transformers, the engine core,
    send_args(engine_args)   ── pipe ──────────────>   the models and kernels (most of a cold start)
    imports, config, tokenizer ...                    builds the config from the arguments, then
                                                      the engine (weights, KV cache, CUDA graphs)
    CoreProcess(config, prestarted=...)  <── ready ── _core_main, as if spawned now

A cold start of `pagoda serve` is mostly Python imports, done twice: once by the server and once by
the freshly spawned core. Spawned first, the core imports while the server imports and reads the
model's config. The core does not wait for the server's config either: given the engine's arguments
(`send_args`) it builds the same config itself once its imports are done (building it is mostly
importing transformers' config classes: seconds), so the two processes' start-ups run side by side
and the core's is the whole critical path. Without arguments (`take(config, ...)` alone, e.g. an
executor class made by the caller) it waits for the caller's config. This module is light on purpose
(no torch at import): it is imported by the command line before anything heavy. A prestarted core
that turns out not to be needed is `close()`d.

Invariant: the config the core builds from the arguments is the one the caller builds from them
(`EngineArgs.create_config` reads only the arguments and the model's files); the caller's copy learns
the core's KV-cache size from its ready message, as with a config handed over.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import types
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
        with _parent_main_hidden():
            self.process.start()
        child_conn.close()            # the core holds the only other end: EOF when it dies
        self._finalizer = weakref.finalize(self, stop_children, [(self.process, self.conn)], 0.0, 5.0)
        self._taken = False
        self.args_sent = False

    def send_args(self, engine_args: Any) -> None:
        """The engine's arguments (`EngineArgs`), sent now: the core builds its config from them as
        soon as its imports are done. Only for a core whose executor class it picks itself."""
        assert not self.args_sent and not self._taken, "a prestarted core gets its arguments once"
        self.args_sent = True
        self.conn.send(_BuildFromArgs(engine_args))

    def take(self, config: Any, executor_class: Any) -> tuple[Any, Connection]:
        """Hands the core its config (nothing if it got the arguments: it builds the same config
        itself); returns (process, conn), from now on the caller's to stop.

        NOTE: the finalizer is detached, not handed over: it is tied to this handle's lifetime, and the
        handle may be collected while the core serves on (e.g. a local of a replica's constructor)."""
        assert not self._taken, "a prestarted core serves one engine"
        if self.args_sent and executor_class is not None:
            raise ValueError(f"a core that builds its config from the arguments picks its own executor; got "
                             f"executor_class={executor_class!r}")
        self._taken = True
        self._finalizer.detach()
        if not self.args_sent:
            self.conn.send((config, executor_class))
        return self.process, self.conn

    def close(self) -> None:
        """Stops a prestarted core that will not be used (nothing once `take` handed it over)."""
        if not self._taken:
            self._finalizer()


@contextlib.contextmanager
def _parent_main_hidden():
    """While a spawned child starts: it does not re-run the parent's main script.

    NOTE: `spawn` makes the child import the parent's `__main__` (by module name, or by running its
    file as `__mp_main__`) so that objects pickled from it resolve. This child's target lives in this
    module, and what it receives later (engine arguments, configs) is defined in pagoda's modules, so it
    never needs the parent's main; and that main can be costly: in a Ray Serve replica it is Ray's
    worker bootstrap script, which imports Ray (seconds of a cold start on the critical path). The
    preparation data is computed in `Process.start()`, so the stand-in is in place only for that call."""
    main = sys.modules.get("__main__")
    stand_in = types.ModuleType("__main__")
    stand_in.__spec__ = None            # neither a module name nor a file to re-run
    sys.modules["__main__"] = stand_in
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main
        else:
            del sys.modules["__main__"]


class _BuildFromArgs:
    """The first message of a core that builds its own config: the engine's arguments."""

    def __init__(self, engine_args: Any) -> None:
        self.engine_args = engine_args


def _prestarted_main(conn: Connection, parent_pid: int) -> None:
    # the imports the core needs anyway, while nothing waits for them yet
    from . import core_process
    from ..models import registry  # noqa: F401 - the model classes and, through them, the kernels
    from ..utils import startup_timeline
    from ..utils.child_process import leave

    startup_timeline.mark("imports")
    try:
        message = conn.recv()
    except (EOFError, OSError):          # not needed after all, or the parent is gone
        leave(0)
    if isinstance(message, _BuildFromArgs):
        startup_timeline.mark("waiting for the arguments")
        config = core_process.config_from_args(message.engine_args, conn)
        startup_timeline.mark("config")
        executor_class = None
    else:
        config, executor_class = message
        startup_timeline.mark("waiting for the config")
    core_process._core_main(config, executor_class, conn, parent_pid, prestarted=True)
