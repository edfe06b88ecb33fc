"""The ingress end of the token channels: one long-lived stream per (ingress, model replica).

Why: a Ray Serve handle stream costs about the same per item whatever the item holds, and relaying
one item per token per stream capped a whole ingress at ~2,000 tokens/s (bench/RESULTS.md). With a
channel, a replica sends every output of this ingress's requests that is ready as one item
(`ChannelBatch`: one item per engine step under load, for any number of streams), and each
request's own call (the *lease*) yields only its `LeaseEnd`. The lease keeps everything else per
request: the router picks its replica, Serve counts it as the replica's ongoing request (load,
autoscaling, back-pressure), cancelling it aborts the request, and its failure is the request's.

    ingress (this)                                        replica
    TokenChannels.sync(): a reader per replica the  ───>  LLMReplica.channel(ChannelRequest): pinned
      router knows (pinned calls), every SYNC_S            to that replica; drains the channel's outbox
    reader: ChannelBatch -> inbox of each request   <───   outbox <- (request id, seq, outputs)
    request: lease = generate(ReplicaRequest(channel))
      yields inbox batches in seq order; at LeaseEnd  <──  LeaseEnd(num_batches, final outputs)
      waits for batches < num_batches, then final

Invariant: a request's batches reach its inbox in any order and leave it in sequence order; its
final outputs leave last. Outputs that reach a replica before this ingress's reader attached wait
in the replica's outbox (kept UNREAD_OUTBOX_TTL_S), so a new replica loses nothing.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Optional

from .router import router_for
from .wire import ChannelRequest, WireOutput

logger = logging.getLogger(__name__)

# How often the ingress looks for replicas it has no channel to (new replicas, reconnects).
SYNC_S = 0.2


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
    """This ingress's channels to the replicas of one model deployment."""

    def __init__(self, handle: Any, app_name: str, deployment_name: str) -> None:
        self.handle = handle
        self.app_name = app_name
        self.deployment_name = deployment_name
        self.channel_id = uuid.uuid4().hex
        self._readers: dict[str, asyncio.Task] = {}      # replica id -> its reader
        self._connected: set[str] = set()                 # replicas whose channel has answered
        self._inboxes: dict[str, Inbox] = {}              # engine request id -> inbox
        self._sweeper: Optional[asyncio.Task] = None

    def replica_ids(self) -> list[str]:
        """The replicas this process's router knows (none before the deployment's first call)."""
        router = router_for(self.app_name, self.deployment_name)
        replicas = getattr(router, "curr_replicas", None) or {}
        return [getattr(key, "unique_id", str(key)) for key in list(replicas)]

    @property
    def available(self) -> bool:
        """Requests can use the channels: every replica the router may pick has a live channel.

        Until then (the first requests, a replica just added) requests stream over their own calls.
        NOTE: a channel call can wait in Serve's router for a while right after start-up, so it is
        the replica's hello, not the call, that makes a channel count.
        """
        replica_ids = self.replica_ids()
        if not replica_ids:
            return False
        self.sync()
        return all(replica_id in self._connected for replica_id in replica_ids)

    def reader_alive(self, replica_id: str) -> bool:
        reader = self._readers.get(replica_id)
        return reader is not None and not reader.done()

    def sync(self) -> None:
        """Opens a reader to every known replica that has none; keeps sweeping in the background."""
        for replica_id in self.replica_ids():
            if not self.reader_alive(replica_id):
                self._readers[replica_id] = asyncio.ensure_future(self._read(replica_id))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    def open_inbox(self, request_id: str) -> Inbox:
        inbox = self._inboxes[request_id] = Inbox()
        return inbox

    def close_inbox(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)

    async def _sweep(self) -> None:
        while self._inboxes or any(not reader.done() for reader in self._readers.values()):
            await asyncio.sleep(SYNC_S)
            for replica_id in self.replica_ids():
                if not self.reader_alive(replica_id):
                    self._readers[replica_id] = asyncio.ensure_future(self._read(replica_id))

    async def _read(self, replica_id: str) -> None:
        try:
            stream = self.handle.options(stream=True).channel.remote(ChannelRequest(self.channel_id, replica_id))
            async for batch in stream:
                self._connected.add(replica_id)      # the first item is the replica's hello
                for request_id, seq, outputs in batch.outputs:
                    inbox = self._inboxes.get(request_id)
                    if inbox is not None:        # (gone: its client left, or it was retried elsewhere)
                        inbox.put(seq, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the replica is gone or restarting; the sweep reconnects
            logger.info("token channel to replica %s closed: %s", replica_id, type(error).__name__)
        finally:
            self._connected.discard(replica_id)
            for inbox in self._inboxes.values():
                inbox.changed.set()              # waiters re-check whether their replica still answers
