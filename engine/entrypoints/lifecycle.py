"""One server's lifecycle state, shared by its HTTP and gRPC fronts: in-flight calls and draining.

Graceful shutdown (SIGTERM):

    drain(): draining = True            -> new calls get 503 / UNAVAILABLE
             wait for in-flight calls   -> up to shutdown_timeout_s
             abort what is still running -> their streams end with finish_reason 'abort'
             wait for those calls to send their last bytes, then return (the server exits)

One object per server, passed explicitly (never module state), so several apps coexist.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Iterator

from ..engine_client import EngineClient
from ..outputs import RequestOutput
from ..processing.input_processor import PromptType
from ..sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# After aborting, the last chunks and [DONE] still have to reach the clients.
_FLUSH_TIMEOUT_S = 5.0


class ServerLifecycle:
    def __init__(self) -> None:
        self.draining = False
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
        """`client.generate`, remembering the request so that drain() can abort it."""
        self.active_request_ids.add(request_id)
        iterator = client.generate(prompt, params, request_id, priority)
        try:
            async for output in iterator:
                yield output
        finally:
            self.active_request_ids.discard(request_id)
            await iterator.aclose()

    async def drain(self, client: EngineClient, timeout_s: float) -> None:
        self.draining = True
        logger.info("draining: %d call(s) in flight; waiting up to %.1f s", self.num_active_calls, timeout_s)
        if not await self._wait_idle(timeout_s):
            pending = sorted(self.active_request_ids)
            logger.info("shutdown timeout reached: aborting %d request(s)", len(pending))
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
