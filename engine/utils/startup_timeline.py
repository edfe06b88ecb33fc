"""Where a process's start-up time goes: one INFO line per phase, with its duration and the time since
the process started.

    start-up: imports 3.12 s (at 3.1 s; MainProcess pid 812)
    start-up: config 0.41 s (at 3.5 s; MainProcess pid 812)
    start-up: imports 4.02 s (at 4.0 s; pagoda-engine-core pid 840)     <- the core, spawned at 3.5 s
    ...
    start-up: ready 14.20 s (at 14.2 s; MainProcess pid 812)           <- ready's duration: the whole start-up

Why: queue-depth autoscaling is only as good as the time a new replica takes to serve, and that time
is spread over two or three processes (the server, its engine core, a Ray replica). Each process logs
its own phases; `bench/startup.py` parses these lines (their format is its contract) into one table.

Four calls, each one line at the place it measures:

    mark(phase)         the phase that ends now began at this thread's previous mark (or `begin()`),
                        or, if it has none, at the process's start (the main thread's imports);
                        phases logged inside it on the same thread (spans) are not counted twice
    begin()             restarts this thread's chain now (the engine core's constructor: it runs
                        on a thread of its own, or after other work in the same process)
    span(phase)         decorator / context manager: exactly the wrapped call, on any thread (a
                        phase that runs beside others, e.g. the tokenizer while the core starts)
    ready(phase)        logs `ready` (or `phase`) with the time since the process started, and
                        closes the timeline

Each phase is logged once: after `ready()` every call returns at once, so nothing costs anything
after start-up (a decorated function pays one flag test per call). A process that builds several
engines without serving (tests, offline `LLM`) never calls `ready()` and logs each start-up.

NOTE: a spawned process (the engine core, a TP worker, a Ray actor) has no logging configured
unless its code did it. There the lines would be dropped (Python's last-resort handler shows
warnings only), so when the root logger has no handler the timeline writes to stderr itself, in
the CLI's format (a script that builds an offline `LLM` without configuring logging sees the lines
too); where logging is configured, its level and handlers decide as for any logger.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, TypeVar

logger = logging.getLogger("pagoda.startup")

LINE_PREFIX = "start-up: "
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"      # as `pagoda serve` configures it

F = TypeVar("F", bound=Callable[..., Any])


def _process_start_monotonic() -> float:
    """time.monotonic() at this process's start: from /proc (Linux), else this module's import."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat") as stat:
            # field 22 (starttime, clock ticks since boot); the command name (field 2) may hold spaces
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            uptime_s = float(uptime.read().split()[0])
        age_s = uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - age_s if 0.0 <= age_s < 86400.0 else now


_origin = _process_start_monotonic()
_closed = False
_thread_state = threading.local()        # chain_start, nested_s (spans since it), span_depth: per thread
_handler_lock = threading.Lock()


def _ensure_output() -> None:
    # see the module's NOTE; checked on every line because logging may be configured after import
    if logger.handlers or logging.getLogger().handlers:
        return
    with _handler_lock:
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def _log(phase: str, duration_s: float, now: float) -> None:
    _ensure_output()
    logger.info("%s%s %.2f s (at %.1f s; %s pid %d)", LINE_PREFIX, phase, duration_s, now - _origin,
                multiprocessing.current_process().name, os.getpid())


def begin() -> None:
    """Starts this thread's chain now: the next `mark` on it measures from here (an engine core
    built on a thread of its own, or after other work in the same process)."""
    if _closed:
        return
    _thread_state.chain_start = time.monotonic()
    _thread_state.nested_s = 0.0


def mark(phase: str) -> None:
    """Logs `phase` as ending now; see the module docstring for where it began."""
    if _closed:
        return
    now = time.monotonic()
    start: Optional[float] = getattr(_thread_state, "chain_start", None)
    nested_s: float = getattr(_thread_state, "nested_s", 0.0)
    duration_s = now - (_origin if start is None else start) - nested_s
    _log(phase, max(duration_s, 0.0), now)
    _thread_state.chain_start = now
    _thread_state.nested_s = 0.0


class span:
    """`with span("tokenizer"): ...` or `@span("tokenizer")` on a function: logs the wrapped call's own
    duration (nothing when it raises: a failed start-up says why elsewhere)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self._starts: list[float] = []           # a stack: the same span may be entered on nested calls

    def __enter__(self) -> None:
        self._starts.append(time.monotonic())
        _thread_state.span_depth = getattr(_thread_state, "span_depth", 0) + 1

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        start = self._starts.pop()
        _thread_state.span_depth -= 1
        if _closed or exc_type is not None:
            return
        now = time.monotonic()
        _log(self.phase, now - start, now)
        if _thread_state.span_depth == 0:        # an outermost span: the next mark leaves it out
            _thread_state.nested_s = getattr(_thread_state, "nested_s", 0.0) + (now - start)

    def __call__(self, function: F) -> F:
        phase = self.phase

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _closed:
                return function(*args, **kwargs)
            with span(phase):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def ready(phase: str = "ready") -> None:
    """Logs `phase` with the time since the process started, and closes the timeline."""
    global _closed
    if _closed:
        return
    now = time.monotonic()
    _log(phase, now - _origin, now)
    _closed = True

