"""Running a request's engine streams: start them, merge them, and stop them when the client leaves.

A completion request with several prompts becomes one engine request per prompt. `start_streams`
waits for each one's first output before any HTTP status is sent, so validation, queue-full and
dead-engine errors still get their proper status code (never a 200 followed by an error). Closing
or cancelling anything here closes the engine iterators, which aborts the requests in the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

from fastapi import Request
from pydantic import BaseModel

from ...outputs import RequestOutput

SSE_DONE = "data: [DONE]\n\n"
T = TypeVar("T")


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    import json

    return f"data: {json.dumps(payload)}\n\n"


async def start_streams(iterators: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The first output of every stream; on any error, closes all streams and raises that error."""
    tasks = [asyncio.ensure_future(anext(iterator)) for iterator in iterators]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(iterators)
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

    Only for handlers whose request body has already been read: the watcher consumes the rest of
    the ASGI receive channel, where only `http.disconnect` can still come.
    """
    work_task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work_task.done():
            work_task.cancel()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if work_task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await work_task
        return None
    return work_task.result()
