"""Helper process for test_core_process: a serving process that the test SIGKILLs.

Starts an `AsyncEngine` with its core in a process of its own (on the checkpoint given as argv[1]),
prints `PID <core pid>` and streams requests until killed, so the kill lands mid-step.
"""
from __future__ import annotations

import asyncio
import sys

from pagoda.engine import EngineArgs, SamplingParams
from pagoda.engine.async_engine import AsyncEngine


async def forever(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    while True:
        async for _ in engine.generate("Once upon a time", params):
            pass


if __name__ == "__main__":       # the spawned core imports this file as __mp_main__: keep the guard
    config = EngineArgs(model=sys.argv[1], kv_cache_memory_bytes=16 << 20, engine_core_process=True).create_config()
    engine = AsyncEngine(config)
    print("PID", engine.core_client.pid, flush=True)
    asyncio.run(forever(engine))
