"""While the step loop idles, a look at the executor every second, so a dead TP worker is noticed
even when no request runs.

`EngineCore.run_loop` blocks on its inbox while it has nothing to run, and only a step or a health
probe reaches the executor. A TP worker that died meanwhile (killed, out of memory) would go
unnoticed until the next request, which would then fail partway instead of being refused, and the
engine would look healthy to anyone not probing it. Both transports therefore hand the loop an
`IdleWatch` around their inbox:

    take(block=True):  wait up to interval_s for commands -> none came: executor.check_health()
                       -> wait again ... -> commands came: hand them to the loop
    take(block=False): the inbox's take, unchanged (a busy loop steps, and a step notices a dead
                       worker by itself)

A failed check raises out of `take`, so out of `run_loop`, exactly like a failed step: the
transport reports `CoreDied` and the engine refuses new requests.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

from .commands import Command

# How long a dead worker of an idle engine can go unnoticed. The multiproc executor's check only
# polls its workers' process sentinels; the Ray executor's pings its worker actors.
IDLE_CHECK_INTERVAL_S = 1.0


class TimedInbox(Protocol):
    def take(self, block: bool, timeout_s: Optional[float] = None) -> list[Command]:
        """What has arrived; block=True waits for something, at most timeout_s (None: no limit)."""


class IdleWatch:
    """The loop's inbox: `inbox`'s commands, and `check_health()` every interval_s while idle."""

    def __init__(self, inbox: TimedInbox, check_health: Callable[[], None],
                 interval_s: float = IDLE_CHECK_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.inbox = inbox
        self.check_health = check_health
        self.interval_s = interval_s

    def take(self, block: bool) -> list[Command]:
        if not block:
            return self.inbox.take(block=False)
        while True:
            commands = self.inbox.take(block=True, timeout_s=self.interval_s)
            if commands:
                return commands
            self.check_health()
