"""A client that leaves is not an error, at whatever point of its request's life it leaves: while its
body arrives, while it waits in the queue, while it runs, while it streams. The request is dropped
quietly: no ERROR log, no traceback, no 500; its engine requests are aborted (counted as such in
the metrics) and the server forgets it.

In process: a real AsyncEngine (one batch seat, so a second request queues) behind `build_app`,
each HTTP request driven through the ASGI app with the client's side scripted (asgi_calls.py).
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pagoda.engine import EngineArgs, SamplingParams
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings

from .asgi_calls import server_errors, start_call, wait_until

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    config = EngineArgs(model=str(tiny_model_dir), kv_cache_memory_bytes=16 << 20, max_num_seqs=1).create_config()
    engine = AsyncEngine(config)
    yield engine
    engine.shutdown()


def aborted(engine: AsyncEngine) -> float:
    value = engine.metrics.registry.get_sample_value(
        "pagoda:request_success_total", {"model_name": engine.model_names[0], "finished_reason": "abort"})
    return value or 0.0


async def stats(engine: AsyncEngine) -> Any:
    return await engine.get_stats()


async def occupy_the_seat(engine: AsyncEngine) -> asyncio.Task:
    """A long request in the one batch seat: whatever comes next waits in the queue."""
    params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)

    async def run() -> None:
        async for _ in engine.generate(PROMPT, params):
            pass

    task = asyncio.create_task(run())
    await wait_until(lambda: _running(engine, 1), 30, "the seat to be taken")
    return task


async def _running(engine: AsyncEngine, count: int) -> bool:
    return (await engine.get_stats()).num_running == count


async def _idle(engine: AsyncEngine) -> bool:
    current = await engine.get_stats()
    return current.num_running == 0 and current.num_waiting == 0 and current.num_free_blocks == current.num_blocks


def completion(**overrides: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **overrides}


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "n": 2}


@pytest.mark.parametrize("path, body, num_engine_requests", [
    ("/v1/completions", completion(), 1),
    ("/v1/completions", completion(stream=True), 1),
    ("/v1/completions", completion(prompt=[PROMPT, "Hello"]), 2),
    ("/v1/chat/completions", {**CHAT, "stream": True}, 2),
], ids=["completion", "stream", "two-prompts", "chat-stream"])
def test_a_client_that_leaves_while_queued_is_dropped_quietly(engine, caplog, path, body, num_engine_requests):
    async def main():
        app = build_app(engine, ServerSettings())
        seat = await occupy_the_seat(engine)
        aborted_before = aborted(engine)
        call = start_call(app, path, body)
        await wait_until(lambda: _waiting(engine, num_engine_requests), 30, "the request to queue")
        call.leave()
        response = await call.result()
        aborted_after = aborted(engine)
        seat.cancel()
        await asyncio.gather(seat, return_exceptions=True)
        await wait_until(lambda: _idle(engine), 10, "the engine to be idle")
        return app.state.lifecycle, response, aborted_after - aborted_before

    lifecycle, response, newly_aborted = asyncio.run(main())
    assert server_errors(caplog.records) == []
    assert response.status in (None, 499), response.body
    assert newly_aborted == num_engine_requests      # one per prompt, as every engine request
    assert lifecycle.num_active_calls == 0 and not lifecycle.active_request_ids


async def _waiting(engine: AsyncEngine, count: int) -> bool:
    return (await engine.get_stats()).num_waiting == count


def test_a_client_that_leaves_while_its_body_arrives_is_not_an_error(engine, caplog):
    async def main():
        app = build_app(engine, ServerSettings())
        call = start_call(app, "/v1/completions", raw_body=b'{"prompt": "Once upon', declared_length=1000)
        await asyncio.sleep(0.2)
        assert not call.task.done()          # the app waits for the rest of the body
        call.leave()
        return app.state.lifecycle, await call.result()

    lifecycle, response = asyncio.run(main())
    assert server_errors(caplog.records) == []
    assert response.status == 499
    assert lifecycle.num_active_calls == 0


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", completion(max_tokens=4000)),
    ("/v1/completions", completion(max_tokens=4000, stream=True)),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 4000, "ignore_eos": True, "n": 1}),
], ids=["completion", "stream", "chat"])
def test_a_client_that_leaves_while_its_request_runs_is_dropped_quietly(engine, caplog, path, body):
    async def main():
        app = build_app(engine, ServerSettings())
        aborted_before = aborted(engine)
        call = start_call(app, path, body)
        await wait_until(lambda: _running(engine, 1), 30, "the request to run")
        if body.get("stream"):
            await wait_until(lambda: len(call.messages) >= 3, 30, "a few chunks")
        call.leave()
        response = await call.result()
        await wait_until(lambda: _idle(engine), 10, "the engine to be idle")
        return app.state.lifecycle, response, aborted(engine) - aborted_before

    lifecycle, response, newly_aborted = asyncio.run(main())
    assert server_errors(caplog.records) == []
    assert response.status in (200, 499)     # a stream's 200 went out before the client left
    assert newly_aborted == 1
    assert lifecycle.num_active_calls == 0 and not lifecycle.active_request_ids
