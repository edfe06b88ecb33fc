"""One server's lifecycle state, shared by its HTTP and gRPC fronts: in-flight calls and draining.

Graceful shutdown (SIGTERM):

    drain(): draining = True            -> new calls get 503 / UNAVAILABLE; calls already accepted,
                                           queued ones included, run on (and are served)
             wait for in-flight calls   -> up to shutdown_timeout_s
             out of time: cutting = True -> abort what still runs or waits; a request that starts
                                           now is refused
             wait for those calls to send their last bytes, then return (the server exits)

A request the drain cuts short must never look like a success: its final output carries
finish_reason 'abort' (`cut_short`), which the fronts turn into a failure the client sees
(`request_cut_error`: HTTP 503 `shutting_down` when nothing was sent yet, else an SSE error event
before `[DONE]`; gRPC UNAVAILABLE). Only the server's side aborts a request whose client still
reads: a client that leaves aborts its own request too, but then nobody reads the result.

One object per server, passed explicitly (never module state), so several apps coexist.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Iterator

from ..engine_client import EngineClient
from ..errors import EngineShuttingDownError
from ..outputs import RequestOutput
from ..processing.input_processor import PromptType
from ..sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# After aborting, the last chunks and [DONE] still have to reach the clients.
_FLUSH_TIMEOUT_S = 5.0


def cut_short(output: RequestOutput) -> bool:
    """True for a final output that the server's side ended (finish_reason 'abort'): the drain ran
    out of time, or the engine (or the replica serving it) shut down. Never a normal finish."""
    return output.finished and any(completion.finish_reason == "abort" for completion in output.outputs)


def request_cut_error() -> EngineShuttingDownError:
    """What a client of a request that was cut short gets (HTTP 503 `shutting_down`, gRPC UNAVAILABLE)."""
    return EngineShuttingDownError("the server shut down before this request finished; retry it")


class ServerLifecycle:
    def __init__(self) -> None:
        self.draining = False
        self.cutting = False                 # the drain ran out of time: what still runs is aborted
        self.num_active_calls = 0
        self.active_request_ids: set[str] = set()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Brackets one inference call (HTTP request until its last byte, or gRPC call)."""
        self.num_active_calls += 1
        try:
            yield
        finally:
            self.num_active_calls -= 1

    async def generate(self, client: EngineClient, prompt: PromptType, params: SamplingParams,
                       request_id: str, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """`client.generate`, remembering the request so that drain() can abort it.

        Invariant: once the drain cuts, every call it waits for ends. A request that starts then is
        refused; one the engine did not know yet when the drain aborted it (e.g. it was still being
        tokenized) is aborted again at its first output.
        """
        if self.cutting:
            raise request_cut_error()
        self.active_request_ids.add(request_id)
        iterator = client.generate(prompt, params, request_id, priority)
        aborted_late = False
        try:
            async for output in iterator:
                if self.cutting and not output.finished and not aborted_late:
                    aborted_late = True
                    await client.abort(request_id)
                yield output
        finally:
            self.active_request_ids.discard(request_id)
            await iterator.aclose()

    async def drain(self, client: EngineClient, timeout_s: float) -> None:
        self.draining = True
        logger.info("draining: %d call(s) in flight; waiting up to %.1f s", self.num_active_calls, timeout_s)
        if not await self._wait_idle(timeout_s):
            self.cutting = True
            pending = sorted(self.active_request_ids)
            logger.warning("shutdown timeout reached: cutting %d request(s) short; their clients get an error",
                           len(pending))
            for request_id in pending:
                await client.abort(request_id)
            await self._wait_idle(_FLUSH_TIMEOUT_S)

    async def _wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.num_active_calls > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True
