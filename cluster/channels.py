"""Token channels: replicas send an ingress its requests' outputs in batches, through a mailbox actor.

Why: a Ray Serve handle stream costs about the same per item whatever the item holds, and relaying
one item per token per stream capped a whole ingress at ~2,000 tokens/s (bench/serve_relay.py,
bench/RESULTS.md). Here each replica sends everything that is ready for one ingress as one actor
call (one per engine step under load, for any number of streams), and each request's own call (the
*lease*) yields only its `LeaseEnd`. The lease keeps everything else per request: Serve's router
picks its replica and counts it (load, autoscaling, back-pressure), cancelling it aborts the request,
and its failure is the request's. The mailbox is a plain Ray actor, outside Serve's admission.

    ingress replica (this)                      Mailbox actor (owned by it)      model replica
    ReplicaRequest(..., channel=ChannelRef) ───────────────────────────────────> generate(): lease
    reader: take() -> inbox of each request <── put(items) <── one call per ready batch ── outbox
      yields inbox batches in seq order; at LeaseEnd  <─────────────────────── LeaseEnd(n, final)
      waits for batches < n, then final

Invariant: a request's batches reach its inbox in any order and leave it in sequence order; its
final outputs leave last. The mailbox dies with the ingress replica that owns it.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .wire import WireOutput

logger = logging.getLogger(__name__)

# How long one `take` waits for items before the reader asks again.
TAKE_TIMEOUT_S = 1.0

Items = list[tuple[str, int, list[WireOutput]]]     # (engine request id, sequence number, outputs)


@dataclass
class ChannelRef:
    """What a request carries to its replica: where to send its outputs."""

    channel_id: str
    mailbox: Any                         # the Mailbox actor handle (`put.remote(items)`)


class Mailbox:
    """The ingress's mailbox (a Ray actor in the cluster; plain in tests): replicas put, the
    ingress takes everything at once."""

    def __init__(self) -> None:
        self._items: Items = []
        self._ready: Optional[asyncio.Event] = None

    def _event(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready

    async def put(self, items: Items) -> None:
        self._items.extend(items)
        self._event().set()

    async def take(self, timeout_s: float) -> Items:
        ready = self._event()
        if not self._items:
            try:
                await asyncio.wait_for(ready.wait(), timeout_s)
            except asyncio.TimeoutError:
                return []
        ready.clear()
        items, self._items = self._items, []
        return items


def ray_mailbox() -> Any:
    """A Mailbox actor next to this process (soft affinity), owned by it: it dies with its owner."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0)(Mailbox)
    strategy = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return actor.options(scheduling_strategy=strategy).remote()


class Inbox:
    """One request's channel batches: put in any order, taken in sequence order."""

    def __init__(self) -> None:
        self._pending: dict[int, list[WireOutput]] = {}
        self.next_seq = 0
        self.changed = asyncio.Event()

    def put(self, seq: int, batch: list[WireOutput]) -> None:
        self._pending[seq] = batch
        self.changed.set()

    def take_ready(self) -> list[list[WireOutput]]:
        """The batches that continue the sequence, in order."""
        ready = []
        while self.next_seq in self._pending:
            ready.append(self._pending.pop(self.next_seq))
            self.next_seq += 1
        return ready


class TokenChannels:
    """The ingress end: one mailbox, one reader, an inbox per request in flight."""

    def __init__(self, mailbox_factory: Callable[[], Any] = ray_mailbox) -> None:
        self._factory = mailbox_factory
        self._ref: Optional[ChannelRef] = None
        self._reader: Optional[asyncio.Task] = None
        self._inboxes: dict[str, Inbox] = {}

    def ref(self) -> ChannelRef:
        """The channel a request names; (re)starts the mailbox and its reader when needed."""
        if self._ref is None or self._reader is None or self._reader.done():
            self._ref = ChannelRef(uuid.uuid4().hex, self._factory())
            self._reader = asyncio.ensure_future(self._read(self._ref))
        return self._ref

    def open_inbox(self, request_id: str) -> Inbox:
        inbox = self._inboxes[request_id] = Inbox()
        return inbox

    def close_inbox(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)

    async def _read(self, ref: ChannelRef) -> None:
        try:
            while True:
                for request_id, seq, outputs in await _result(ref.mailbox.take.remote(TAKE_TIMEOUT_S)):
                    inbox = self._inboxes.get(request_id)
                    if inbox is not None:        # (gone: its client left, or it was retried elsewhere)
                        inbox.put(seq, outputs)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the mailbox died: the next request starts a new one
            logger.warning("token mailbox %s failed; requests waiting on it will time out", ref.channel_id,
                           exc_info=True)
        finally:
            for inbox in self._inboxes.values():
                inbox.changed.set()


async def _result(call: Any) -> Any:
    """An actor call's result (a Ray ObjectRef or, in tests, a coroutine)."""
    return await call
