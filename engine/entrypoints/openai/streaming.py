"""Running a request's engine streams: start them, merge them, and stop them when the client leaves.

A completion request with several prompts becomes one engine request per prompt. `start_streams`
waits for each one's first output before any HTTP status is sent, so validation, queue-full,
dead-engine and cut-short (the drain aborted it while it waited) errors still get their proper
status code (never a 200 followed by an error). Closing or cancelling anything here closes the
engine iterators, which aborts the requests in the engine.

A client that leaves is normal, not an error: `run_until_disconnected` then cancels the work, waits
for it to unwind (its engine requests are aborted and counted as such) and returns None; the
routes answer 499, which nobody reads, and log nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

from fastapi import Request
from pydantic import BaseModel

from ...errors import EngineDeadError
from ...outputs import RequestOutput
from ..lifecycle import cut_short, request_cut_error

SSE_DONE = "data: [DONE]\n\n"
# nginx's "client closed request": the status of a response no client is left to read
CLIENT_CLOSED_REQUEST = 499
T = TypeVar("T")


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    import json

    return f"data: {json.dumps(payload)}\n\n"


async def start_streams(iterators: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The first output of every stream; on any error, closes all streams and raises that error.

    Nothing has been sent to the client yet, so every failure here is one it can simply retry: a
    first output already cut short (the drain aborted the request while it waited in the queue) is
    a 503 `shutting_down` rather than an empty 200, and an engine that died before the request's
    first output is a 503 `engine_dead`, as for a new request, not a 500 for a generation that
    failed partway.
    """
    tasks = [asyncio.ensure_future(anext(iterator)) for iterator in iterators]
    try:
        firsts = list(await asyncio.gather(*tasks))
        if any(cut_short(first) for first in firsts):
            raise request_cut_error()
        return firsts
    except BaseException as error:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(iterators)
        if isinstance(error, EngineDeadError) and error.during_request:
            raise EngineDeadError("the engine failed before this request started and has stopped; retry it") from None
        raise


async def close_all(iterators: list[AsyncIterator[RequestOutput]]) -> None:
    for iterator in iterators:
        with contextlib.suppress(Exception):
            await iterator.aclose()   # type: ignore[attr-defined]


async def merge_streams(iterators: list[AsyncIterator[RequestOutput]],
                        firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) in arrival order, beginning with the prefetched first outputs."""
    for index, first in enumerate(firsts):
        yield index, first
    live = [index for index, first in enumerate(firsts) if not first.finished]
    if len(iterators) == 1:               # the common case needs no tasks
        if live:
            async for output in iterators[0]:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, Optional[RequestOutput], Optional[BaseException]]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for output in iterators[index]:
                queue.put_nowait((index, output, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, None, error))
            return
        queue.put_nowait((index, None, None))

    tasks = [asyncio.ensure_future(pump(index)) for index in live]
    try:
        remaining = len(tasks)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(iterators)


async def run_until_disconnected(request: Request, work: Awaitable[T]) -> Optional[T]:
    """Awaits `work`, cancelling it if the client disconnects first (then returns None).

    Invariant: both tasks have ended before either's outcome is read. A task asked to cancel is
    still unwinding (closing its engine streams) until awaited, and reading it then would raise
    InvalidStateError: an internal error, with a traceback, for a client that merely left. Should
    `work` finish in the same moment as the client leaves, its result (or error) stands.

    Only for handlers whose request body has already been read: the watcher consumes the rest of
    the ASGI receive channel, where only `http.disconnect` can still come.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # NOTE: also when this handler is cancelled itself: neither task may outlive it.
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
        await asyncio.gather(work_task, watcher, return_exceptions=True)
    if work_task.cancelled():
        return None
    return work_task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
