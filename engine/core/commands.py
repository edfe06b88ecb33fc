"""What a client sends the engine core's step loop, and what the loop answers.

Both transports carry exactly these objects: `core_thread.py` hands them over in memory,
`core_process.py` pickles them through a pipe. Plain data only, so they pickle small.

    client -> loop:  AddRequests | AbortRequests | CheckHealth | Shutdown        (a CommandQueue)
    loop -> client:  StepDone after every turn, HealthAnswer, AddRejected         (an event callback)
    transport -> client: CoreDied when the loop failed or its process is gone
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional, Union

from ..outputs import EngineCoreOutput, EngineStats
from .request import Request


# -- client -> loop ------------------------------------------------------------------------------------
@dataclass
class AddRequests:
    """The core requests of one client request (n > 1: several), added all or none."""
    request_id: str                      # the client-visible id, named in AddRejected
    core_requests: list[Request]


@dataclass
class AbortRequests:
    core_request_ids: list[str]


@dataclass
class CheckHealth:
    """Asks the executor whether every worker is alive; answered by HealthAnswer."""
    probe_id: int


@dataclass
class Shutdown:
    """Leave the loop once the commands sent before it are applied."""


Command = Union[AddRequests, AbortRequests, CheckHealth, Shutdown]


# -- loop -> client ------------------------------------------------------------------------------------
@dataclass
class StepDone:
    """One turn of the loop: the commands that had arrived were applied, then one step ran (or none
    when idle).

    num_added: core requests the turn's AddRequests carried (the client counts those it sent but the
        stats do not show yet).
    prefix_summary_changed: False means `stats.cached_prefix_hashes` was left out (it is up to
        thousands of hashes, refreshed at most once a second): keep the previous one.
    """
    outputs: list[EngineCoreOutput]
    stats: EngineStats
    num_added: int
    prefix_summary_changed: bool


@dataclass
class HealthAnswer:
    probe_id: int
    error: Optional[str]                 # None: healthy; else what failed (the loop then dies)


@dataclass
class AddRejected:
    """An AddRequests the core refused (e.g. one of its ids is still live in the core)."""
    request_id: str
    message: str


@dataclass
class CoreDied:
    """The loop raised (its traceback) or its process is gone (how it ended). Nothing follows."""
    reason: str


Event = Union[StepDone, HealthAnswer, AddRejected, CoreDied]
EventSink = Callable[[Event], None]


class CommandQueue:
    """Commands in arrival order, handed over in batches; thread-safe, `put` never blocks."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._commands: list[Command] = []

    def put(self, command: Command) -> None:
        with self._cv:
            self._commands.append(command)
            self._cv.notify()

    def take(self, block: bool, timeout_s: Optional[float] = None) -> list[Command]:
        """Everything queued so far; with block=True waits until there is something, or at most
        timeout_s (then the list may be empty)."""
        with self._cv:
            if block:
                self._cv.wait_for(lambda: self._commands, timeout_s)
            commands, self._commands = self._commands, []
        return commands
