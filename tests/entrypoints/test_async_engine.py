"""AsyncEngine in process: concurrent streams, cancellation frees blocks, stop strings, queue limit,
a failing step kills the engine (errors, refusals, /health 503, no hang), shutdown joins the thread."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from pagoda.engine import EngineArgs, SamplingParams
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.engine_client import EngineClient
from pagoda.engine.entrypoints.openai.api_server import build_app
from pagoda.engine.entrypoints.settings import ServerSettings
from pagoda.engine.errors import EngineDeadError, EngineOverloadedError, EngineShuttingDownError
from pagoda.engine.executor.uniproc import UniprocExecutor

from .server_helpers import streams_cut_by

PROMPT = "Once upon a time"


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def make_engine(model_dir, **kwargs) -> AsyncEngine:
    executor_class = kwargs.pop("executor_class", None)
    max_queued = kwargs.pop("max_queued_requests", None)
    config = EngineArgs(model=str(model_dir), kv_cache_memory_bytes=16 << 20, **kwargs).create_config()
    return AsyncEngine(config, max_queued_requests=max_queued, executor_class=executor_class)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    yield engine
    engine.shutdown()
    assert not engine.core_client.is_alive()


async def collect(engine: AsyncEngine, prompt, params, request_id=None):
    outputs = [output async for output in engine.generate(prompt, params, request_id)]
    return outputs


def test_is_an_engine_client(engine):
    assert isinstance(engine, EngineClient)


def test_concurrent_streams_and_deltas(engine):
    async def main():
        return await asyncio.gather(*(collect(engine, f"{PROMPT} {i}", greedy(6), f"req-{i}") for i in range(20)))

    for outputs in asyncio.run(main()):
        final = outputs[-1]
        assert final.finished and all(not o.finished for o in outputs[:-1])
        assert len(final.outputs[0].token_ids) == 6
        assert [t for o in outputs for t in o.outputs[0].delta_token_ids] == final.outputs[0].token_ids
        assert "".join(o.outputs[0].delta_text for o in outputs) == final.outputs[0].text


def test_cancelled_consumer_frees_blocks_within_a_second(engine):
    async def main():
        idle = await engine.get_stats()
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(PROMPT, greedy(4000), "to-cancel"):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 30)
        busy = await engine.get_stats()
        assert busy.num_running == 1 and busy.num_free_blocks < idle.num_free_blocks
        task.cancel()
        cancelled_at = time.monotonic()
        while True:
            stats = await engine.get_stats()
            if stats.num_running == 0 and stats.num_free_blocks == idle.num_free_blocks:
                return time.monotonic() - cancelled_at
            assert time.monotonic() - cancelled_at < 1.0, stats
            await asyncio.sleep(0.01)

    assert asyncio.run(main()) < 1.0


def test_abort_ends_the_stream_with_abort(engine):
    async def main():
        outputs = []
        async for output in engine.generate(PROMPT, greedy(4000), "to-abort"):
            outputs.append(output)
            if len(outputs) == 2:
                await engine.abort("to-abort")
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"


def test_stop_string_finishes_and_frees_the_core_request(engine):
    async def main():
        base = (await collect(engine, PROMPT, greedy(24)))[-1].outputs[0].text
        visible = [i for i in range(1, len(base)) if base[i].strip()]
        if not visible:
            pytest.skip(f"no stop string candidate in {base!r}")
        stop = base[visible[0]]
        stopped = (await collect(engine, PROMPT, greedy(24, stop=[stop])))[-1].outputs[0]
        await asyncio.sleep(0.2)
        return base, stop, stopped, await engine.get_stats()

    base, stop, stopped, stats = asyncio.run(main())
    assert stopped.finish_reason == "stop" and stopped.text == base[: base.index(stop)]
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_bad_request_raises_value_error_and_queues_nothing(engine):
    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(engine, [5] * 9000, greedy(2))
        return await engine.get_stats()

    assert asyncio.run(main()).num_waiting == 0


def test_queue_limit(tiny_model_dir):
    engine = make_engine(tiny_model_dir, max_num_seqs=1, max_queued_requests=1)
    try:
        async def main():
            started = asyncio.Event()

            async def run_long():
                async for _ in engine.generate(PROMPT, greedy(4000), "long"):
                    started.set()

            long_task = asyncio.create_task(run_long())
            await asyncio.wait_for(started.wait(), 30)
            waiting = asyncio.create_task(collect(engine, PROMPT, greedy(2), "waiting"))
            await asyncio.sleep(0.05)
            with pytest.raises(EngineOverloadedError, match="max_queued_requests=1"):
                await collect(engine, PROMPT, greedy(2), "refused")
            await engine.abort("long")
            await long_task
            return await waiting

        assert asyncio.run(main())[-1].outputs[0].finish_reason == "length"
    finally:
        engine.shutdown()


class _FailingExecutor(UniprocExecutor):
    fail = threading.Event()

    def execute_model(self, scheduler_output):
        if self.fail.is_set():
            raise RuntimeError("simulated device failure")
        return super().execute_model(scheduler_output)


def test_failing_step_kills_the_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir, executor_class=_FailingExecutor)
    try:
        async def main():
            errors = await streams_cut_by(engine, [PROMPT] * 3, greedy(4000), _FailingExecutor.fail.set)
            assert len(errors) == 3 and all(e.during_request for e in errors)
            assert engine.errored
            with pytest.raises(EngineDeadError) as refused:
                await collect(engine, PROMPT, greedy(2))
            assert not refused.value.during_request
            assert not await engine.is_healthy()

            app = build_app(engine, ServerSettings())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                health = await http.get("/health")
                completion = await http.post("/v1/completions", json={"prompt": PROMPT})
            return health, completion

        health, completion = asyncio.run(main())
        assert health.status_code == 503
        assert completion.status_code == 503 and completion.json()["error"]["code"] == "engine_dead"
    finally:
        _FailingExecutor.fail.clear()
        started = time.monotonic()
        engine.shutdown()
        assert not engine.core_client.is_alive() and time.monotonic() - started < 5


def test_shutdown_refuses_new_requests(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    engine.shutdown()
    assert not engine.core_client.is_alive()

    async def main():
        with pytest.raises(EngineShuttingDownError):
            await collect(engine, PROMPT, greedy(2))

    asyncio.run(main())


def test_a_consumer_that_falls_behind_gets_merged_outputs_and_loses_nothing(engine):
    """Outputs queued while the consumer was busy come as one: fewer chunks, same tokens and text."""
    async def main():
        outputs = []
        async for output in engine.generate(PROMPT, greedy(24, logprobs=1), "slow-consumer"):
            outputs.append(output)
            if len(outputs) == 1:
                await asyncio.sleep(1.0)          # the engine runs on meanwhile
        return outputs

    outputs = asyncio.run(main())
    final = outputs[-1].outputs[0]
    assert outputs[-1].finished and len(final.token_ids) == 24
    assert len(outputs) < 24, "the outputs queued during the pause were not merged"
    assert [t for o in outputs for t in o.outputs[0].delta_token_ids] == final.token_ids
    assert "".join(o.outputs[0].delta_text for o in outputs) == final.text
    assert [entry for o in outputs for entry in o.outputs[0].delta_logprobs] == final.logprobs
